package qmp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// ErrSymlink is returned by Dial when the socket path is a symbolic link.
var ErrSymlink = errors.New("qmp: socket path is a symbolic link")

// ErrNotSocket is returned by Dial when the path is not a Unix socket.
var ErrNotSocket = errors.New("qmp: path is not a unix socket")

// ErrPeerMismatch is returned by Dial when Options.ExpectPID is set and
// the process on the other end of the socket is a different one.
var ErrPeerMismatch = errors.New("qmp: socket peer is not the expected process")

// PeerCred is the identity of the process that listens on the socket, as
// the kernel recorded it (SO_PEERCRED): it cannot be forged by the peer.
type PeerCred struct {
	PID int
	UID int
	GID int
}

// connectNoFollow connects to the Unix socket at path without following a
// symbolic link in its last component and without a race between the check
// and the connect: the socket inode is opened with O_PATH|O_NOFOLLOW, checked
// with fstat, and connected through /proc/self/fd/N, which names exactly that
// inode. This also lifts the 108-byte sun_path limit on path.
func connectNoFollow(ctx context.Context, path string) (*net.UnixConn, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, fmt.Errorf("qmp: %w", err)
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		return nil, fmt.Errorf("%w: %s", ErrSymlink, path)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return nil, fmt.Errorf("%w: %s is %v", ErrNotSocket, path, fi.Mode().Type())
	}
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, fmt.Errorf("%w: %s", ErrSymlink, path)
		}
		return nil, fmt.Errorf("qmp: open %s: %w", path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("qmp: fstat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("%w: %s was replaced by a non-socket", ErrNotSocket, path)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", "/proc/self/fd/"+strconv.Itoa(fd))
	if err != nil {
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Err != nil {
			err = oe.Err // the /proc/self/fd name means nothing to the reader
		}
		return nil, fmt.Errorf("qmp: connect %s: %w", path, err)
	}
	return c.(*net.UnixConn), nil
}

// peerCred reads SO_PEERCRED of a connected Unix socket.
func peerCred(c *net.UnixConn) (PeerCred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return PeerCred{}, fmt.Errorf("qmp: peer credentials: %w", err)
	}
	var uc *unix.Ucred
	var serr error
	if err := rc.Control(func(fd uintptr) {
		uc, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return PeerCred{}, fmt.Errorf("qmp: peer credentials: %w", err)
	}
	if serr != nil {
		return PeerCred{}, fmt.Errorf("qmp: SO_PEERCRED: %w", serr)
	}
	return PeerCred{PID: int(uc.Pid), UID: int(uc.Uid), GID: int(uc.Gid)}, nil
}
