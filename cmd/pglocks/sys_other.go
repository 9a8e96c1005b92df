//go:build !linux

package main

import (
	"os"
	"syscall"
)

// isTerminal reports whether f is a character device: the best guess
// without a terminal ioctl.
func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0 && f.Name() != os.DevNull
}

// childAttr puts COMMAND in a process group of its own unless it shares our
// terminal.
func childAttr(ownGroup bool) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: ownGroup}
}
