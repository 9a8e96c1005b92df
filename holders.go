package pglocks

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// A Holder is a server session that holds a lock, as pg_locks and
// pg_stat_activity show it. Reading another user's sessions in
// pg_stat_activity takes the pg_read_all_stats role; without it, only PID is
// known.
type Holder struct {
	PID             int32     // the server process of the session
	ApplicationName string    // without the " @…" that Lead adds
	ClientAddr      string    // host:port; "" for a Unix socket or when not visible
	BackendStart    time.Time // when the session connected
	// Since is when the session was elected, for a session that leads
	// through [Locker.Lead] on a session of its own; otherwise it is zero.
	Since time.Time
	// Shared is set for a session that holds the lock in shared mode.
	Shared bool
}

// Holders returns the sessions that hold key now, in any mode, ordered by
// pid: one exclusive holder, or any number of shared ones, or none. Like
// [Locker.Leader] it reads pg_locks and pg_stat_activity on a connection of
// the Locker's pool, and returns [ErrStandby] on a standby.
func (l *Locker) Holders(ctx context.Context, key Key) ([]Holder, error) {
	switch {
	case ctx == nil:
		return nil, lockError(key, errNilContext)
	case !key.valid():
		return nil, lockError(key, ErrInvalidKey)
	case l.table.isClosed():
		return nil, lockError(key, ErrClosed)
	}
	c, err := l.pool.open.src.acquire(ctx)
	if err != nil {
		switch {
		case ctx.Err() != nil:
			return nil, lockError(key, ctxError(ctx))
		case pastDeadline(ctx): // see opener.acquire
			return nil, lockError(key, context.DeadlineExceeded)
		}
		return nil, lockError(key, fmt.Errorf("connect: %w", err))
	}
	defer c.release()
	sub, classid, objid := key.PgLocks()
	var (
		recovery bool
		list     string
	)
	if err := c.query(ctx, sqlHolders, []any{int32(sub), int64(classid), int64(objid)}, &recovery, &list); err != nil {
		return nil, lockError(key, err)
	}
	if recovery {
		return nil, lockError(key, ErrStandby)
	}
	var rows []struct {
		PID   int32     `json:"pid"`
		Mode  string    `json:"mode"`
		App   string    `json:"app"`
		Addr  string    `json:"addr"`
		Port  int       `json:"port"`
		Start time.Time `json:"start"`
	}
	if err := json.Unmarshal([]byte(list), &rows); err != nil {
		return nil, lockError(key, fmt.Errorf("reading pg_locks: %w", err))
	}
	hs := make([]Holder, len(rows))
	for i, r := range rows {
		h := Holder{PID: r.PID, ApplicationName: r.App, BackendStart: r.Start, Shared: r.Mode == "ShareLock"}
		if r.Addr != "" {
			h.ClientAddr = net.JoinHostPort(r.Addr, strconv.Itoa(r.Port))
		}
		h.ApplicationName, h.Since = leaderSince(h.ApplicationName)
		hs[i] = h
	}
	return hs, nil
}

// Leader returns the session that holds key exclusively now (the leader of
// an election run with [Locker.Lead]), or an error matching [ErrNoLeader].
// It reads pg_locks and pg_stat_activity on a connection of the Locker's pool,
// and sees the database that pool is connected to. On a standby it returns
// an error matching [ErrStandby]: a standby's pg_locks does not show the
// primary's locks, so it cannot tell who leads.
func (l *Locker) Leader(ctx context.Context, key Key) (Holder, error) {
	hs, err := l.Holders(ctx, key)
	if err != nil {
		return Holder{}, err
	}
	for _, h := range hs {
		if !h.Shared {
			return h, nil
		}
	}
	return Holder{}, lockError(key, ErrNoLeader)
}

// leaderSince splits the application_name of a leader's session into the
// name it had and the time of its election, as Lead marks it (or as older
// pglocks did); an unmarked app is returned whole, with a zero time.
func leaderSince(app string) (string, time.Time) {
	if i := strings.LastIndex(app, sinceMark); i >= 0 {
		if t, err := time.Parse(sinceLayout, app[i+len(sinceMark):]); err == nil {
			return app[:i], t
		}
	}
	if i := strings.LastIndex(app, oldSinceMark); i >= 0 {
		if t, err := time.Parse(time.RFC3339Nano, app[i+len(oldSinceMark):]); err == nil {
			return app[:i], t
		}
	}
	return app, time.Time{}
}
