package pgtest

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

// endSignals are the signals that end a program unless it handles them: from
// a terminal (SIGINT, SIGHUP), from kill, systemd or a container runtime
// (SIGTERM), and from a shell pipeline whose reader is gone (SIGPIPE, which
// Go raises for a write to a broken standard output or error).
var endSignals = []os.Signal{os.Interrupt, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGPIPE}

// NotifyContext returns a copy of parent that is cancelled on SIGINT,
// SIGTERM or SIGHUP, or when standard output or error turns out to be a
// broken pipe (go run ./examples/quickstart | head -3), so that a program's
// deferred Stop removes its throwaway server; context.Cause says which
// signal it was. Until stop is called, those signals no longer end the
// program, and a write to a broken standard output fails with EPIPE
// instead. A SIGPIPE from a socket whose peer went away (a server
// connection) cancels nothing.
//
// Telling a broken standard output from a broken socket needs Linux; on
// other systems a broken standard output makes writes fail without
// cancelling ctx, and the program removes its server when it ends.
func NotifyContext(parent context.Context) (ctx context.Context, stop context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(parent)
	wait := watchSignals(ctx.Done(), func(sig os.Signal) {
		cancel(errors.New(sig.String() + " signal received"))
	})
	return ctx, func() {
		cancel(context.Canceled)
		wait()
	}
}

// StopOnSignal makes SIGINT, SIGTERM, SIGHUP, and a write to a broken
// standard output or error, stop every throwaway server and PgBouncer that
// this process started and has not stopped yet, remove their files, and then
// end the process as the signal would have. Main calls it; a TestMain that
// does without Main calls it before m.Run. Calling the function it returns
// undoes it, and waits until it is undone (goroutine checks may follow).
func StopOnSignal() (stop func()) {
	done := make(chan struct{})
	wait := watchSignals(done, func(sig os.Signal) {
		stopAll()
		die(sig)
	})
	return sync.OnceFunc(func() {
		close(done)
		wait()
	})
}

// watchSignals calls onSignal with the first of endSignals to arrive, until
// done is closed; SIGPIPE counts only when standard output or error is the
// broken pipe. The function it returns waits for that, and then lets the
// signals have their default effect again.
func watchSignals(done <-chan struct{}, onSignal func(os.Signal)) (wait func()) {
	// Room for one of each: a SIGPIPE from a socket must not crowd out the
	// SIGTERM after it (signal.Notify drops what does not fit).
	ch := make(chan os.Signal, len(endSignals))
	signal.Notify(ch, endSignals...)
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		for {
			select {
			case sig := <-ch:
				if sig == syscall.SIGPIPE && brokenOutput() < 0 {
					continue // a socket's peer went away: its write fails with EPIPE
				}
				onSignal(sig)
				return
			case <-done:
				return
			}
		}
	}()
	return func() {
		<-exited
		signal.Stop(ch)
	}
}

// die ends the process by sig, as if it had not been handled: the parent
// (the go command, a shell) sees "signal: terminated" as it would have.
func die(sig os.Signal) {
	signal.Reset(sig)
	s := sig.(syscall.Signal)
	if s == syscall.SIGPIPE {
		// The Go runtime ignores a SIGPIPE sent with kill; it ends the
		// process by SIGPIPE when a write to a broken fd 1 or 2 fails, as
		// it did before the signal was handled.
		if fd := brokenOutput(); fd > 0 {
			_, _ = os.NewFile(uintptr(fd), "broken").Write([]byte{'\n'})
		}
	} else {
		_ = syscall.Kill(os.Getpid(), s)
		// Another thread may take it: give it time to end the process.
		time.Sleep(5 * time.Second)
	}
	os.Exit(128 + int(s)) // what a shell reports for death by s
}

// throwaways are the servers and PgBouncers this process has started and not
// stopped yet, with the functions that stop them and remove their files.
var throwaways struct {
	sync.Mutex
	m map[any]func()
}

// track records that x (a *Server or a *PgBouncer) is stopped by remove.
func track(x any, remove func()) {
	throwaways.Lock()
	defer throwaways.Unlock()
	if throwaways.m == nil {
		throwaways.m = map[any]func(){}
	}
	throwaways.m[x] = remove
}

// untrack forgets x, which is stopped.
func untrack(x any) {
	throwaways.Lock()
	defer throwaways.Unlock()
	delete(throwaways.m, x)
}

// stopAll stops every server and PgBouncer still tracked, those started
// while it runs included.
func stopAll() {
	for {
		throwaways.Lock()
		removes := make([]func(), 0, len(throwaways.m))
		for x, remove := range throwaways.m {
			removes = append(removes, remove)
			delete(throwaways.m, x)
		}
		throwaways.Unlock()
		if len(removes) == 0 {
			return
		}
		var wg sync.WaitGroup
		for _, remove := range removes {
			wg.Go(remove)
		}
		wg.Wait()
	}
}
