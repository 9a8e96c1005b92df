package pglocks

import (
	"strconv"
	"strings"
)

// Lockers tell each other about contended keys with notifications on
// notifyChannel, so that a key freed in one process reaches a waiter in
// another at once, without a connection per waiter:
//
//	w KEY KEY ...   a waiter wants these keys (it waits multiplexed, not in
//	                the server's queue, so the holder cannot see it there)
//	f KEY KEY ...   these keys were just released
//
// KEY is Key.String: "42" for a bigint key, "1,2" for a pair. A Locker that
// holds a wanted key notifies when it releases it; one that released it just
// before hearing the want says so at once.

// Payload kinds.
const (
	wantedMark = 'w'
	freedMark  = 'f'
)

// maxPayload is the longest payload sent; the server allows 7999 bytes.
const maxPayload = 7000

// payloads packs keys into as few payloads of kind as fit.
func payloads(kind byte, keys []Key) []string {
	var out []string
	var b strings.Builder
	for _, k := range keys {
		s := k.String()
		if b.Len() > 0 && b.Len()+1+len(s) > maxPayload {
			out = append(out, b.String())
			b.Reset()
		}
		if b.Len() == 0 {
			b.WriteByte(kind)
		}
		b.WriteByte(' ')
		b.WriteString(s)
	}
	if b.Len() > 0 {
		out = append(out, b.String())
	}
	return out
}

// parsePayload reads a payload; ok is false for one pglocks did not send.
func parsePayload(p string) (kind byte, keys []Key, ok bool) {
	if len(p) < 3 || (p[0] != wantedMark && p[0] != freedMark) || p[1] != ' ' {
		return 0, nil, false
	}
	for _, f := range strings.Fields(p[2:]) {
		k, ok := parseKeyString(f)
		if !ok {
			return 0, nil, false
		}
		keys = append(keys, k)
	}
	return p[0], keys, len(keys) > 0
}

// parseKeyString reads Key.String's form back.
func parseKeyString(s string) (Key, bool) {
	if a, b, pair := strings.Cut(s, ","); pair {
		x, err1 := strconv.ParseInt(a, 10, 32)
		y, err2 := strconv.ParseInt(b, 10, 32)
		if err1 != nil || err2 != nil {
			return Key{}, false
		}
		return Pair(int32(x), int32(y)), true
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return Key{}, false
	}
	return ID(v), true
}
