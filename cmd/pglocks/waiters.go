package main

import (
	"context"
	"errors"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
)

// A multiplexed wait is not in pg_locks: a wait for any of a key's slots
// (Slots(n), pglocks run --slots N), or a Locker's wait beyond its sessions,
// waits in its process and tries the keys now and then. Such a waiter says
// which keys it wants on the notification channel Lockers share (see the
// root package's notify.go): "w KEY KEY ...", KEY as Key.String writes it.
// It says so once, and again whenever it hears that one of them was freed
// ("f KEY ..."), since another process may take it first. So ls asks: it
// tells the channel that the keys it looks for may be free (each --name
// key, and its slot 0, which every wait for any of its slots wants), and
// each waiter for one of them tries once more and says what it wants; the
// notification names the waiter's session. A Locker on a driver without
// notifications (lib/pq), or behind a transaction-mode pooler, does not
// answer.
const (
	notifyChannel = "pglocks"
	maxPayload    = 7000 // the server allows 7999 bytes
	// After ls's own notification comes back (one round trip), answers
	// are awaited for 4 round trips more, at least askMin; at most askMax
	// in all (a pooler in transaction mode never brings it back).
	askMin = 200 * time.Millisecond
	askMax = time.Second
)

// askWaiters asks who waits multiplexed for any of keys; it returns the
// keys each answering session (by pid) wants.
func askWaiters(ctx context.Context, pool *pgxpool.Pool, keys []pglocks.Key) (map[int][]pglocks.Key, error) {
	c, err := pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	defer c.Release()
	conn := c.Conn()
	if _, err := conn.Exec(ctx, "LISTEN "+notifyChannel); err != nil {
		return nil, err
	}
	var self int
	if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&self); err != nil {
		return nil, err
	}
	defer func() {
		_, _ = conn.Exec(context.WithoutCancel(ctx), "UNLISTEN "+notifyChannel)
		// Drop what came meanwhile: the next refresh asks again.
		done, cancel := context.WithCancel(ctx)
		cancel()
		for {
			if n, _ := conn.WaitForNotification(done); n == nil {
				break
			}
		}
	}()
	asked := time.Now()
	if _, err := conn.Exec(ctx, "SELECT pg_notify('"+notifyChannel+"', p) FROM unnest($1::text[]) p", freedPayloads(keys)); err != nil {
		return nil, err
	}
	wants := map[int][]pglocks.Key{}
	deadline := asked.Add(askMax)
	echoed := false
	for {
		wctx, cancel := context.WithDeadline(ctx, deadline)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		if n == nil {
			if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
				return wants, nil // no more answers
			}
			return wants, err
		}
		if n.Channel != notifyChannel {
			continue
		}
		if int(n.PID) == self {
			if !echoed {
				// Our own notification, back: one round trip.
				echoed = true
				deadline = time.Now().Add(min(max(4*time.Since(asked), askMin), askMax))
			}
			continue
		}
		if ks, ok := wantedKeys(n.Payload); ok {
			wants[int(n.PID)] = append(wants[int(n.PID)], ks...)
		}
	}
}

// freedPayloads packs "f KEY ..." payloads of keys.
func freedPayloads(keys []pglocks.Key) []string {
	var out []string
	var b strings.Builder
	for _, k := range keys {
		s := k.String()
		if b.Len() > 0 && b.Len()+1+len(s) > maxPayload {
			out = append(out, b.String())
			b.Reset()
		}
		if b.Len() == 0 {
			b.WriteByte('f')
		}
		b.WriteByte(' ')
		b.WriteString(s)
	}
	if b.Len() > 0 {
		out = append(out, b.String())
	}
	return out
}

// wantedKeys reads a "w KEY ..." payload; ok is false for any other.
func wantedKeys(p string) (keys []pglocks.Key, ok bool) {
	rest, ok := strings.CutPrefix(p, "w ")
	if !ok {
		return nil, false
	}
	for _, f := range strings.Fields(rest) {
		scheme := "id"
		if strings.Contains(f, ",") {
			scheme = "pair"
		}
		k, err := parseKey(scheme, f)
		if err != nil {
			return nil, false
		}
		keys = append(keys, k)
	}
	return keys, len(keys) > 0
}

// probeKeys are the keys to ask about for labels: each NAME's key and its
// slot 0 (every wait for any of its slots wants slot 0).
func probeKeys(labels map[pglocks.Key]label) []pglocks.Key {
	var keys []pglocks.Key
	for k, lb := range labels {
		if lb.slot < 0 {
			keys = append(keys, k, k.Slot(0))
		}
	}
	slices.SortFunc(keys, compareKeys)
	return keys
}

// waiterRows makes a row of each multiplexed wait that wants tells (see
// askWaiters) for a key of labels: a wait for any of NAME's N slots (Slots
// is N, Key is empty), or for NAME's key (the mode is not told). held, the
// rows of pg_locks, tell who blocks them.
func waiterRows(wants map[int][]pglocks.Key, labels map[pglocks.Key]label, held []lockInfo) []lockInfo {
	holders := map[string][]int{}
	for _, l := range held {
		if l.Granted {
			holders[l.Key] = append(holders[l.Key], l.PID)
		}
	}
	type slotWait struct {
		pid  int
		base pglocks.Key
	}
	slotWaits := map[slotWait]int{} // how many slots: the highest wanted, plus one
	var out []lockInfo
	for pid, keys := range wants {
		seen := map[pglocks.Key]bool{}
		for _, k := range keys {
			lb, ok := labels[k]
			if !ok || seen[k] {
				continue
			}
			seen[k] = true
			if lb.slot >= 0 {
				sw := slotWait{pid, lb.base}
				slotWaits[sw] = max(slotWaits[sw], lb.slot+1)
				continue
			}
			li := lockInfo{Name: lb.name, Schemes: lb.schemes, PID: pid, Multiplexed: true}
			li.setKey(k)
			li.waitKeys = []string{li.Key}
			out = append(out, li)
		}
	}
	for sw, n := range slotWaits {
		lb := labels[sw.base]
		li := lockInfo{Name: lb.name, Schemes: lb.schemes, Slots: n, Mode: "exclusive", PID: sw.pid, Multiplexed: true}
		for i := range n {
			li.waitKeys = append(li.waitKeys, sw.base.Slot(i).String())
		}
		out = append(out, li)
	}
	for i, l := range out {
		out[i].BlockedBy = []int{}
		for _, k := range l.waitKeys {
			for _, p := range holders[k] {
				if p != l.PID && !slices.Contains(out[i].BlockedBy, p) {
					out[i].BlockedBy = append(out[i].BlockedBy, p)
				}
			}
		}
	}
	for _, l := range out {
		slices.Sort(l.BlockedBy)
	}
	return out
}

// describeSessions fills in the application and client of rows from
// pg_stat_activity, and drops none: a session that has ended since it
// answered shows as -.
func describeSessions(ctx context.Context, pool *pgxpool.Pool, rows []lockInfo) error {
	var pids []int32
	for _, l := range rows {
		pids = append(pids, int32(l.PID))
	}
	res, err := pool.Query(ctx, `
		SELECT pid, coalesce(application_name, ''),
		       CASE WHEN backend_start IS NULL THEN '' ELSE coalesce(host(client_addr), 'local socket') END
		FROM pg_stat_activity WHERE pid = ANY($1)`, pids)
	if err != nil {
		return err
	}
	type session struct{ app, client string }
	byPID := map[int]session{}
	var pid int
	var s session
	if _, err := pgx.ForEachRow(res, []any{&pid, &s.app, &s.client}, func() error { byPID[pid] = s; return nil }); err != nil {
		return err
	}
	for i, l := range rows {
		rows[i].Application, rows[i].Client = byPID[l.PID].app, byPID[l.PID].client
	}
	return nil
}
