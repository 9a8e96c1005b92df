package pglocks

import (
	"hash/crc32"
	"strings"
)

// The keys that schema-migration tools take on PostgreSQL while they
// migrate, so that a process can wait for a migration in progress (take the
// key, then let it go), or take part in the tools' own exclusion. Each is
// frozen by test vectors computed by the tool itself where it is
// installable here (goose, golang-migrate, Rails' migrator) or read from
// its source (Prisma).

// gooseLockID is goose's lock.DefaultLockID (pressly/goose v3,
// lock/session_locker_options.go).
const gooseLockID = 4097083626

// prismaLockID is the key Prisma Migrate's schema engine takes with
// pg_advisory_lock on PostgreSQL.
const prismaLockID = 72707369

// migrateSalt is golang-migrate's advisoryLockIDSalt (database/util.go).
const migrateSalt = 1486364155

// railsSalt is ActiveRecord's Migrator::MIGRATOR_SALT.
const railsSalt = 2053462845

// MigrationGoose returns the key that goose (pressly/goose v3) takes while
// it migrates, with its session locker (lock.NewPostgresSessionLocker) and
// its default lock ID, lock.DefaultLockID: ID(4097083626). goose's table
// locker takes no advisory lock, and a goose configured with
// lock.WithLockID takes [ID] of that number instead.
func MigrationGoose() Key { return named(ID(gooseLockID), "goose migrations") }

// MigrationGolangMigrate returns the key that golang-migrate
// (golang-migrate/migrate v4, its postgres and pgx drivers) takes while it
// migrates database: its GenerateAdvisoryLockId(database, schema, table),
// the CRC-32 (IEEE) of "schema\x00table\x00database" multiplied by
// 1486364155 in 32 bits. schema is the schema of its migrations table (""
// for "public", the default of a role whose search_path starts with it) and
// table the table's name ("" for "schema_migrations"); database is the
// database's name as the server has it (current_database()).
func MigrationGolangMigrate(database, schema, table string) Key {
	if schema == "" {
		schema = "public"
	}
	if table == "" {
		table = "schema_migrations"
	}
	sum := crc32.ChecksumIEEE([]byte(strings.Join([]string{schema, table, database}, "\x00"))) * migrateSalt
	return named(ID(int64(sum)), "golang-migrate migrations ("+database+")")
}

// MigrationRails returns the key that Rails' migrator (ActiveRecord 5 to 8,
// rails db:migrate) takes while it migrates database: its
// generate_migrator_advisory_lock_id, 2053462845 × the CRC-32 (Zlib.crc32)
// of the database's name (current_database()), as a bigint.
func MigrationRails(database string) Key {
	return named(ID(railsSalt*int64(crc32.ChecksumIEEE([]byte(database)))), "rails migrations ("+database+")")
}

// MigrationPrisma returns the key that Prisma Migrate (prisma migrate
// deploy, dev and reset) takes while it migrates: ID(72707369).
func MigrationPrisma() Key { return named(ID(prismaLockID), "prisma migrations") }

// MigrationLabel names k if it is the key one of the migration tools above
// takes in database (golang-migrate's with its default migrations table,
// public.schema_migrations): "goose migrations", "golang-migrate
// migrations (db)", "rails migrations (db)" or "prisma migrations"; ok is
// false otherwise. `pglocks ls` labels keys with it.
func MigrationLabel(k Key, database string) (label string, ok bool) {
	switch k {
	case ID(gooseLockID):
		return "goose migrations", true
	case ID(prismaLockID):
		return "prisma migrations", true
	case MigrationGolangMigrate(database, "", ""):
		return "golang-migrate migrations (" + database + ")", true
	case MigrationRails(database):
		return "rails migrations (" + database + ")", true
	}
	return "", false
}
