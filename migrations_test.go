package pglocks_test

import (
	"testing"

	"github.com/pglocks/pglocks"
)

// The migration tools' keys, frozen by vectors the tools computed:
// goose's lock.DefaultLockID and golang-migrate's
// database.GenerateAdvisoryLockId (called in bench/peers, which imports
// both, and checked there against a real goose and golang-migrate run);
// Rails' from Debian's ruby-activerecord 6.1.7.10:
//
//	ruby -e 'require "active_record"; require "zlib"; %w[postgres app_production x].each { |d|
//	  puts ActiveRecord::Migrator::MIGRATOR_SALT * Zlib.crc32(d) }'
//
// (the body of its generate_migrator_advisory_lock_id, for
// current_database() = d); Prisma's from its schema engine's source.
func TestMigrationKeys(t *testing.T) {
	for _, tt := range []struct {
		what string
		key  pglocks.Key
		want int64
	}{
		{"goose", pglocks.MigrationGoose(), 4097083626},
		{"prisma", pglocks.MigrationPrisma(), 72707369},
		{"golang-migrate postgres", pglocks.MigrationGolangMigrate("postgres", "", ""), 143310882},
		{"golang-migrate postgres, defaults spelled out", pglocks.MigrationGolangMigrate("postgres", "public", "schema_migrations"), 143310882},
		{"golang-migrate app_production", pglocks.MigrationGolangMigrate("app_production", "", ""), 4200097840},
		{"golang-migrate x, tenant.migs", pglocks.MigrationGolangMigrate("x", "tenant", "migs"), 2234077659},
		{"rails postgres", pglocks.MigrationRails("postgres"), 737815420147457505},
		{"rails app_production", pglocks.MigrationRails("app_production"), 4615154450383096620},
		{"rails x", pglocks.MigrationRails("x"), 4852813054924090935},
	} {
		if got, ok := tt.key.Int64(); !ok || got != tt.want {
			t.Errorf("%s: key %v, want ID(%d)", tt.what, tt.key, tt.want)
		}
	}
}

// MigrationLabel names each tool's key in its database, and nothing else:
// not another database's, not a key of the same number in the pair space.
func TestMigrationLabel(t *testing.T) {
	for _, tt := range []struct {
		key  pglocks.Key
		db   string
		want string
	}{
		{pglocks.ID(4097083626), "app", "goose migrations"},
		{pglocks.ID(72707369), "app", "prisma migrations"},
		{pglocks.MigrationGolangMigrate("app", "", ""), "app", "golang-migrate migrations (app)"},
		{pglocks.MigrationRails("app"), "app", "rails migrations (app)"},
		{pglocks.MigrationGolangMigrate("app", "", ""), "other", ""},
		{pglocks.MigrationRails("app"), "other", ""},
		{pglocks.MigrationGolangMigrate("app", "tenant", ""), "app", ""},
		{pglocks.Pair(0, 72707369), "app", ""},
		{pglocks.Name("goose migrations"), "app", ""},
	} {
		got, ok := pglocks.MigrationLabel(tt.key, tt.db)
		if got != tt.want || ok != (tt.want != "") {
			t.Errorf("MigrationLabel(%v, %q) = %q, %v; want %q", tt.key, tt.db, got, ok, tt.want)
		}
	}
}
