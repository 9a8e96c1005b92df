package pglocks

import (
	"errors"
	"strconv"
	"strings"
	"testing"
)

// Errors about a key made from a name show the name, quoted, before the
// number; other keys, and a key whose slot another key has taken since, show
// the number alone. Run without a server:
//
//	PGLOCKS_TEST_SERVER=none go test -run TestKeyNames .
func TestKeyNames(t *testing.T) {
	tests := []struct {
		name string
		key  Key
		want string
	}{
		{"Name", Name("tick"), `pglocks: lock "tick" (-546921001532167208): held by another session`},
		{"NameCRC32", NameCRC32("crc32-key"), `pglocks: lock "crc32-key" (` + NameCRC32("crc32-key").String() + `): held by another session`},
		{"NameNode", NameNode("node-key"), `pglocks: lock "node-key" (` + NameNode("node-key").String() + `): held by another session`},
		{"NameRails", NameRails("foo", 0), `pglocks: lock "foo" (208889121,0): held by another session`},
		{"NameDjangoPglock", NameDjangoPglock("myapp.tasks.send_report"), `pglocks: lock "myapp.tasks.send_report" (` + NameDjangoPglock("myapp.tasks.send_report").String() + `): held by another session`},
		{"NameDotNet", NameDotNet("abc"), `pglocks: lock "abc" (` + NameDotNet("abc").String() + `): held by another session`},
		{"quoted", Name("a \"b\"\n"), `pglocks: lock "a \"b\"\n" (` + Name("a \"b\"\n").String() + `): held by another session`},
		{"ID", ID(12345), `pglocks: lock 12345: held by another session`},
		{"Pair", Pair(1, 2), `pglocks: lock 1,2: held by another session`},
		{"IDRails", IDRails(77, 0), `pglocks: lock 77,0: held by another session`},
		{"zero", Key{}, `pglocks: lock invalid: held by another session`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := lockError(tt.key, ErrLocked)
			if got := err.Error(); got != tt.want {
				t.Errorf("got  %s\nwant %s", got, tt.want)
			}
			if !errors.Is(err, ErrLocked) {
				t.Errorf("%v does not match ErrLocked", err)
			}
		})
	}
	// Key.String is the number, whatever the key was made from.
	if s := Name("tick").String(); s != "-546921001532167208" {
		t.Errorf("Name(tick).String() = %s", s)
	}
	if Name("tick") != ID(-546921001532167208) {
		t.Error("Name(tick) != ID(its number)")
	}
}

// A name longer than the table keeps is cut at a character's start, and
// shown followed by "…"; a Name of it again writes nothing.
func TestKeyNameLong(t *testing.T) {
	name := strings.Repeat("x", maxKeyName-1) + "é" + strings.Repeat("y", 100)
	k := Name(name)
	want := `pglocks: lock "` + strings.Repeat("x", maxKeyName-1) + `"… (` + k.String() + `): lock already released`
	if got := lockError(k, ErrReleased).Error(); got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
	before := nameSlot(k).Load()
	if Name(name); nameSlot(k).Load() != before {
		t.Error("the same long name was written again")
	}
}

// A key whose slot another key has taken shows its number alone, and is
// named again when it is made again.
func TestKeyNameEvicted(t *testing.T) {
	k := Name("evicted")
	// Find another name whose key has the same slot.
	var other Key
	for i := 0; ; i++ {
		if o := Name("other-" + strconv.Itoa(i)); nameSlot(o) == nameSlot(k) && o != k {
			other = o
			break
		}
	}
	if got := lockError(k, ErrLocked).Error(); got != "pglocks: lock "+k.String()+": held by another session" {
		t.Errorf("evicted: %s", got)
	}
	if !strings.Contains(lockError(other, ErrLocked).Error(), `"other-`) {
		t.Errorf("the other key is not named: %v", lockError(other, ErrLocked))
	}
	Name("evicted")
	if got := lockError(k, ErrLocked).Error(); !strings.HasPrefix(got, `pglocks: lock "evicted" (`) {
		t.Errorf("made again: %s", got)
	}
	// The same key made from another name shows the latest.
	if k1, k2 := NameDotNet("00000000ffffffff"), NameDotNet("00000000FFFFFFFF"); k1 != k2 ||
		!strings.Contains(lockError(k1, ErrLocked).Error(), `"00000000FFFFFFFF"`) {
		t.Errorf("same key, two names: %v", lockError(k1, ErrLocked))
	}
}

// Making the same key from the same name again allocates nothing, however
// long the name: only a new name (or one whose slot another took) is
// written.
func TestKeyNameAllocs(t *testing.T) {
	for _, name := range []string{"nightly-report", strings.Repeat("x", 1024)} {
		Name(name)
		if n := testing.AllocsPerRun(1000, func() { _ = Name(name) }); n != 0 {
			t.Errorf("Name of a %d-byte name: %v allocations", len(name), n)
		}
	}
	NameDotNet("abc")
	if n := testing.AllocsPerRun(1000, func() { _ = NameDotNet("abc") }); n != 0 {
		t.Errorf("NameDotNet: %v allocations", n)
	}
}

// An error is named when it is made: a later write to the slot does not
// change what it says.
func TestKeyNameFixedAtError(t *testing.T) {
	k := Name("fixed")
	err := lockError(k, ErrLocked)
	nameSlot(k).Store(&keyName{key: ID(1), name: "x", n: 1})
	if got := err.Error(); !strings.Contains(got, `"fixed"`) {
		t.Errorf("got %s", got)
	}
	Name("fixed")
}

// Names are written and read from many goroutines at once (go test -race).
func TestKeyNamesConcurrent(t *testing.T) {
	done := make(chan struct{})
	for g := range 4 {
		go func() {
			defer func() { done <- struct{}{} }()
			for i := range 2000 {
				name := "concurrent-" + strconv.Itoa(i%300)
				k := Name(name)
				if s := lockError(k, ErrLocked).Error(); strings.Contains(s, `"`) && !strings.Contains(s, `"`+name+`"`) {
					t.Errorf("goroutine %d: %s names another key", g, s)
					return
				}
			}
		}()
	}
	for range 4 {
		<-done
	}
}
