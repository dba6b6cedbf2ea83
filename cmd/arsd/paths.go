package main

import (
	"fmt"
	"log/slog"
	"os"
	"syscall"
)

// checkQMPDir vets the directory QMP sockets are discovered in: every
// socket there is taken for a VM arsd controls, so whoever can create
// entries in it can present a socket. A symlink or a directory anyone may
// write (sticky bit or not) is refused; a group-writable one or one owned
// by another user (libvirt setups) is accepted with a warning.
func checkQMPDir(dir string, log *slog.Logger) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("qmp dir: %w", err)
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		return fmt.Errorf("qmp dir %s is a symbolic link; give its real path", dir)
	}
	if !fi.IsDir() {
		return fmt.Errorf("qmp dir %s is not a directory", dir)
	}
	perm := fi.Mode().Perm()
	if perm&0o002 != 0 {
		return fmt.Errorf("qmp dir %s is writable by anyone (mode %04o): any user could present a QMP socket; chmod o-w", dir, perm)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if ok && int(st.Uid) != os.Geteuid() {
		log.Warn("qmp dir is owned by another user: that user can present QMP sockets", "dir", dir, "uid", st.Uid)
	}
	if perm&0o020 != 0 {
		log.Warn("qmp dir is group-writable: members of its group can present QMP sockets", "dir", dir, "mode", fmt.Sprintf("%04o", perm))
	}
	return nil
}
