package pglocks

// names.go: the names that keys were made from lately, so that an error
// about a key can show the name beside the number.

import (
	"strconv"
	"strings"
	"sync/atomic"
	"unicode/utf8"
)

// A Key is its number only, so that Keys compare as the locks they name.
// The constructors that hash or pack a name ([Name], [NameCRC32],
// [NameNode], [NameRails], [NameDjangoPglock], [NameDotNet]) also write
// the name into a small table shared by the process, in the slot the key
// hashes to, unless that slot holds the same key and name already (a loop
// over a few names writes nothing, and allocates nothing). An error about a
// key looks its slot up when it is made: if the slot holds that key, the
// error shows the name; if another key has taken the slot since, it shows
// the number alone.

// keyNameBits is the log2 of how many names the table keeps (1024).
const keyNameBits = 10

// maxKeyName is how many bytes of a name the table keeps; an error shows a
// longer name cut there, followed by "…".
const maxKeyName = 128

// keyName is one slot's name.
type keyName struct {
	key  Key
	name string // at most maxKeyName bytes of the name
	n    int    // the name's length
}

// keyNames is the table.
var keyNames [1 << keyNameBits]atomic.Pointer[keyName]

// nameSlot is the slot of k: its number's bits mixed (a NameDotNet pair of
// a short name has the same low bits as any other), and its key space.
func nameSlot(k Key) *atomic.Pointer[keyName] {
	h := (uint64(k.v) ^ uint64(k.kind)) * 0x9e3779b97f4a7c15
	return &keyNames[h>>(64-keyNameBits)]
}

// named records that k was made from name, and returns k.
func named(k Key, name string) Key {
	p := nameSlot(k)
	if kn := p.Load(); kn != nil && kn.key == k && kn.n == len(name) && strings.HasPrefix(name, kn.name) {
		return k
	}
	cut := name
	if len(name) > maxKeyName {
		// Not in the middle of a character.
		i := maxKeyName
		for i > maxKeyName-utf8.UTFMax && !utf8.RuneStart(name[i]) {
			i--
		}
		cut = name[:i]
	}
	p.Store(&keyName{key: k, name: strings.Clone(cut), n: len(name)})
	return k
}

// nameOf returns the table's name for k, or nil.
func nameOf(k Key) *keyName {
	if !k.valid() {
		return nil
	}
	if kn := nameSlot(k).Load(); kn != nil && kn.key == k {
		return kn
	}
	return nil
}

// describe is how errors name k: as [Key.String] does, after its name
// (quoted) when n, the name's table entry, is not nil.
func describe(k Key, n *keyName) string {
	if n == nil {
		return k.String()
	}
	s := strconv.Quote(n.name)
	if n.n > len(n.name) {
		s += "…"
	}
	return s + " (" + k.String() + ")"
}
