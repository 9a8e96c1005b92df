package pglocks

// recent.go: a bounded memory of keys seen lately.

import "time"

// recentKeys remembers keys released in the last recentFor, at most
// recentMax of them.
type recentKeys struct {
	at    map[Key]time.Time
	order []recentKey // oldest first; a key may appear more than once
}

type recentKey struct {
	k  Key
	at time.Time
}

const (
	recentFor = 2 * time.Second
	recentMax = 4096
)

func (r *recentKeys) add(k Key) {
	now := time.Now()
	if r.at == nil {
		r.at = make(map[Key]time.Time)
	}
	r.at[k] = now
	r.order = append(r.order, recentKey{k, now})
	for len(r.order) > recentMax || now.Sub(r.order[0].at) >= recentFor {
		old := r.order[0]
		r.order = r.order[1:]
		if r.at[old.k].Equal(old.at) {
			delete(r.at, old.k)
		}
	}
}

// take reports whether k was released lately, and forgets it.
func (r *recentKeys) take(k Key) bool {
	ok := r.has(k)
	delete(r.at, k)
	return ok
}

func (r *recentKeys) has(k Key) bool {
	t, ok := r.at[k]
	return ok && time.Since(t) < recentFor
}
