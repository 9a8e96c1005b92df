package pglocks

import (
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"hash/crc32"
	"math/bits"
	"strconv"
)

// keyKind tells which of PostgreSQL's two advisory key spaces a Key is in.
type keyKind uint8

const (
	kindInvalid keyKind = iota // the zero Key
	kindInt64                  // pg_advisory_lock(bigint); objsubid 1 in pg_locks
	kindPair                   // pg_advisory_lock(int4, int4); objsubid 2 in pg_locks
)

// Key identifies one advisory lock in a database. PostgreSQL has two key
// spaces that never collide: a single bigint ([ID], [Name], [NameCRC32]) and a
// pair of int4 ([Pair]). ID(1) and Pair(0, 1) are different locks.
//
// Keys are comparable and may be used as map keys; two Keys are equal exactly
// when they name the same lock. The zero Key is invalid: every function that
// takes one returns [ErrInvalidKey] for it.
//
// A Key holds no name (its String is the number), but an error about a key
// that [Name], [NameCRC32], [NameNode], [NameRails], [NameDjangoPglock] or
// [NameDotNet] made shows the name before the number:
//
//	pglocks: lock "tick" (-546921001532167208): held by another session
//
// The process remembers the names of the keys made last (about a thousand),
// so a key made long ago, among many others since, may be shown by its
// number alone.
type Key struct {
	kind keyKind
	v    int64 // the bigint, or a<<32 | uint32(b) for a pair
}

// ID returns the key that pg_advisory_lock(id) takes.
func ID(id int64) Key { return Key{kind: kindInt64, v: id} }

// Pair returns the key that pg_advisory_lock(a, b) takes. It is a different
// lock from every [ID] key, whatever the numbers.
func Pair(a, b int32) Key { return Key{kind: kindPair, v: int64(a)<<32 | int64(uint32(b))} }

// Name returns the bigint key hashtextextended(name, 0), so that plain SQL can
// take the same lock:
//
//	SELECT pg_advisory_lock(hashtextextended('nightly-report', 0));
//
// The hash is computed in Go (a port of PostgreSQL's hash_bytes_extended); it
// equals the server's for databases whose encoding is UTF-8 and whose default
// collation is deterministic (the default). In a database with another
// encoding, names that are not plain ASCII hash differently on the server.
func Name(name string) Key { return named(ID(int64(hashBytesExtended(name))), name) }

// NameCRC32 returns the key that django-pglocks (1.0.x) uses for a string
// lock id: the CRC-32 (IEEE) of the name's UTF-8 bytes, read as a signed int32,
// used as the bigint key. Use it to share a lock with a Django application.
func NameCRC32(name string) Key {
	return named(ID(int64(int32(crc32.ChecksumIEEE([]byte(name))))), name)
}

// Int64 returns the bigint of a key in the bigint space ([ID], [Name],
// [NameCRC32], [NameDjangoPglock], and [NameDotNet] for hashed names and
// 16-hex-digit ones); ok is false for a pair key and the zero Key.
func (k Key) Int64() (id int64, ok bool) { return k.v, k.kind == kindInt64 }

// Int32s returns the two int4 of a [Pair] key; ok is false for other keys.
func (k Key) Int32s() (a, b int32, ok bool) {
	a, b = k.pair()
	return a, b, k.kind == kindPair
}

// NameNode returns the key that the npm package advisory-lock (2.x) uses
// for a lock name: the SHA-256 of the name's UTF-8 bytes, read as two
// little-endian int32 from bytes 0–3 and 4–7, taken as a pair key
// (pg_advisory_lock(a, b)). Use it to share a lock with a Node.js process.
func NameNode(name string) Key {
	sum := sha256.Sum256([]byte(name))
	return named(Pair(int32(binary.LittleEndian.Uint32(sum[0:4])), int32(binary.LittleEndian.Uint32(sum[4:8]))), name)
}

// NameRails returns the key that Ruby's with_advisory_lock gem (4.x to 7.x)
// uses for a String lock name on PostgreSQL: the pair (CRC-32 of the name's
// bytes & 0x7fffffff, prefix & 0x7fffffff), where the gem's prefix comes from
// the WITH_ADVISORY_LOCK_PREFIX environment variable read as an integer (0
// when unset). NameRails("foo", 0) is Pair(208889121, 0).
func NameRails(name string, prefix int64) Key {
	return named(IDRails(int64(crc32.ChecksumIEEE([]byte(name))), prefix), name)
}

// IDRails returns the key that with_advisory_lock uses for an Integer lock
// name, which it does not hash: the pair (id & 0x7fffffff, prefix &
// 0x7fffffff).
func IDRails(id, prefix int64) Key {
	return Pair(int32(id&0x7fffffff), int32(prefix&0x7fffffff))
}

// NameDjangoPglock returns the key that django-pglock (the maintained
// library, PyPI django-pglock, not the older django-pglocks of [NameCRC32])
// uses for a str lock id: the SHA-256 of the name's UTF-8 bytes, bytes 0–7
// read as a little-endian signed int64, used as the bigint key
// (pg_advisory_lock(id)). An int lock id is used as given, which is [ID].
// Its decorator without a lock id uses the function's module and name,
// f"{module.__name__}.{func.__name__}", such as "myapp.tasks.send_report".
// django-pglock refuses an empty lock id (ValueError "Must supply a lock
// ID", as it tests not lock_id), so "" has a key here but no Django
// counterpart.
func NameDjangoPglock(name string) Key {
	sum := sha256.Sum256([]byte(name))
	return named(ID(int64(binary.LittleEndian.Uint64(sum[:8]))), name)
}

// NameDotNet returns the key that the .NET library DistributedLock
// (madelson/DistributedLock, PostgresAdvisoryLockKey(name, allowHashing))
// uses for a lock name. It tries three forms in turn:
//
//   - ASCII: a name of at most 9 characters, all below 0x80, is packed 7
//     bits a character from the top, then a 0 bit, then 1 bits to fill 64,
//     and used as a pair key (high and low 32 bits). "" is Pair(2147483647,
//     -1); a 10-character name is hashed.
//   - hex: 16 hex digits ("00000000ffffffff") are the bigint key they spell,
//     and "8hex,8hex" ("00000001,ffffffff") the pair of int32 they spell,
//     each half read as two's complement; digits only, either case, no sign,
//     "0x" or spaces. A 16- or 17-character name that is not such is hashed.
//   - hashed: any other name (so any with a non-ASCII character): the
//     SHA-1 of its UTF-8 bytes, bytes 0–7 read as a little-endian signed
//     int64, used as the bigint key.
//
// .NET hashes only when the caller passes allowHashing: true, and throws
// FormatException otherwise; any name it accepts without hashing maps the
// same way with it, so NameDotNet always allows hashing and never fails.
// .NET strings are UTF-16: a Go string that is not valid UTF-8 has no .NET
// counterpart (it is hashed as its bytes).
func NameDotNet(name string) Key { return named(dotNetKey(name), name) }

// dotNetKey is NameDotNet's key.
func dotNetKey(name string) Key {
	if len(name) <= 9 && isASCII(name) {
		var v int64
		for i := 0; i < len(name); i++ {
			v = v<<7 | int64(name[i])
		}
		v <<= 1
		for i := len(name); i < 9; i++ {
			v = v<<7 | 0x7f
		}
		return Key{kind: kindPair, v: v}
	}
	if k, ok := dotNetHex(name); ok {
		return k
	}
	sum := sha1.Sum([]byte(name))
	return ID(int64(binary.LittleEndian.Uint64(sum[:8])))
}

// isASCII reports whether every byte of s is below 0x80.
func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// dotNetHex reads DistributedLock's hex forms of a name: 16 hex digits (a
// bigint key) or 8 hex digits, a comma and 8 more (a pair key).
func dotNetHex(name string) (Key, bool) {
	pair := len(name) == 17 && name[8] == ','
	if !pair && len(name) != 16 {
		return Key{}, false
	}
	hi, ok1 := hex32(name[:8])
	lo, ok2 := hex32(name[len(name)-8:])
	if !ok1 || !ok2 {
		return Key{}, false
	}
	v := int64(hi)<<32 | int64(lo)
	if pair {
		return Key{kind: kindPair, v: v}, true
	}
	return ID(v), true
}

// hex32 reads 8 hex digits as C#'s int.TryParse(s,
// NumberStyles.AllowHexSpecifier) does: digits of either case only.
func hex32(s string) (uint32, bool) {
	var v uint32
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		v = v<<4 | uint32(c)
	}
	return v, true
}

// MaxSlots is the most slots [Slots] takes.
const MaxSlots = 1024

// Slot returns the key of slot i of k, which [Slots] takes: the pair key
// whose two int4 are the high and the low 32 bits of
//
//	hashtextextended('pglocks:slot:' || K || ':' || I, 0)
//
// where K is k.String() ("42", or "1,2" for a pair) and I is i in decimal.
// psql takes slot 0 of ID(42) with
//
//	SELECT pg_advisory_lock((h >> 32)::int4, h::bit(32)::int4)
//	FROM (SELECT hashtextextended('pglocks:slot:42:0', 0) AS h) s;
//
// Slot keys are in the pair key space, so no key that [ID], [Name],
// [NameCRC32] or [NameDjangoPglock] makes is ever a slot key; a [Pair] is
// one only if its two int4 happen to be such a hash (about 2^-64 for any
// given pair), and NameNode, NameRails and IDRails pairs are other hashes
// or small numbers; a NameDotNet pair is a packed ASCII name, or the
// numbers a hex name spells (a Pair by another name).
// The rule holds in UTF-8 databases, as [Name] does. It returns the zero
// Key for the zero Key or a negative i.
func (k Key) Slot(i int) Key {
	if !k.valid() || i < 0 {
		return Key{}
	}
	h := hashBytesExtended("pglocks:slot:" + k.String() + ":" + strconv.Itoa(i))
	return Key{kind: kindPair, v: int64(h)}
}

// valid reports whether k was made by a constructor.
func (k Key) valid() bool { return k.kind == kindInt64 || k.kind == kindPair }

// PgLocks returns how the server's pg_locks view shows the key's advisory
// lock: objsubid 1 for a bigint key (classid its high 32 bits, objid its low
// 32 bits) and 2 for a pair (classid the first int4, objid the second, both
// as unsigned). For the zero Key it returns zeros.
func (k Key) PgLocks() (objsubid int16, classid, objid uint32) {
	switch k.kind {
	case kindInt64:
		objsubid = 1
	case kindPair:
		objsubid = 2
	default:
		return 0, 0, 0
	}
	return objsubid, uint32(k.v >> 32), uint32(k.v)
}

// KeyFromPgLocks returns the key of an advisory lock as pg_locks shows it
// (see [Key.PgLocks]); ok is false when objsubid is neither 1 nor 2.
func KeyFromPgLocks(objsubid int16, classid, objid uint32) (k Key, ok bool) {
	v := int64(classid)<<32 | int64(objid)
	switch objsubid {
	case 1:
		return ID(v), true
	case 2:
		return Key{kind: kindPair, v: v}, true
	}
	return Key{}, false
}

// pair returns the two int4 of a pair key.
func (k Key) pair() (a, b int32) { return int32(k.v >> 32), int32(k.v) }

// String returns the key as SQL would write its arguments: "42" for ID(42),
// "1,2" for Pair(1, 2), and "invalid" for the zero Key.
func (k Key) String() string {
	switch k.kind {
	case kindInt64:
		return strconv.FormatInt(k.v, 10)
	case kindPair:
		a, b := k.pair()
		return strconv.FormatInt(int64(a), 10) + "," + strconv.FormatInt(int64(b), 10)
	}
	return "invalid"
}

// hashBytesExtended is PostgreSQL's hash_bytes_extended (src/common/hashfn.c,
// Bob Jenkins' lookup3) with seed 0, as a little-endian server computes it.
// hashtextextended(t, 0) is this function over the text's bytes.
func hashBytesExtended(k string) uint64 {
	n := len(k)
	a := 0x9e3779b9 + uint32(n) + 3923095
	b, c := a, a
	for ; n >= 12; n -= 12 {
		a += le32(k[0:4])
		b += le32(k[4:8])
		c += le32(k[8:12])
		a, b, c = mix(a, b, c)
		k = k[12:]
	}
	// The last 0..11 bytes; the lowest byte of c is left alone, as in PostgreSQL.
	switch n {
	case 11:
		c += uint32(k[10]) << 24
		fallthrough
	case 10:
		c += uint32(k[9]) << 16
		fallthrough
	case 9:
		c += uint32(k[8]) << 8
		fallthrough
	case 8:
		b += le32(k[4:8])
		a += le32(k[0:4])
	case 7:
		b += uint32(k[6]) << 16
		fallthrough
	case 6:
		b += uint32(k[5]) << 8
		fallthrough
	case 5:
		b += uint32(k[4])
		fallthrough
	case 4:
		a += le32(k[0:4])
	case 3:
		a += uint32(k[2]) << 16
		fallthrough
	case 2:
		a += uint32(k[1]) << 8
		fallthrough
	case 1:
		a += uint32(k[0])
	}
	_, b, c = final(a, b, c)
	return uint64(b)<<32 | uint64(c)
}

// le32 reads four bytes as a little-endian uint32.
func le32(s string) uint32 {
	return uint32(s[0]) | uint32(s[1])<<8 | uint32(s[2])<<16 | uint32(s[3])<<24
}

func mix(a, b, c uint32) (uint32, uint32, uint32) {
	a -= c
	a ^= bits.RotateLeft32(c, 4)
	c += b
	b -= a
	b ^= bits.RotateLeft32(a, 6)
	a += c
	c -= b
	c ^= bits.RotateLeft32(b, 8)
	b += a
	a -= c
	a ^= bits.RotateLeft32(c, 16)
	c += b
	b -= a
	b ^= bits.RotateLeft32(a, 19)
	a += c
	c -= b
	c ^= bits.RotateLeft32(b, 4)
	b += a
	return a, b, c
}

func final(a, b, c uint32) (uint32, uint32, uint32) {
	c ^= b
	c -= bits.RotateLeft32(b, 14)
	a ^= c
	a -= bits.RotateLeft32(c, 11)
	b ^= a
	b -= bits.RotateLeft32(a, 25)
	c ^= b
	c -= bits.RotateLeft32(b, 16)
	a ^= c
	a -= bits.RotateLeft32(c, 4)
	b ^= a
	b -= bits.RotateLeft32(a, 14)
	c ^= b
	c -= bits.RotateLeft32(b, 24)
	return a, b, c
}
