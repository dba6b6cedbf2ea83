package ipc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// RingMethod is the method name a RingServer passes to its Authorizer.
const RingMethod = "ring.attach"

// ringHello is the frame sent with the fds (or alone, with Error, on refusal).
type ringHello struct {
	Params RingParams `json:"params"`
	Error  string     `json:"error,omitempty"`
}

// RingServer hands a fresh ring to every authorized client: after
// SO_PEERCRED identification and the Authorizer's yes, it sends the memfd
// and eventfd with SCM_RIGHTS and the ring parameters, then runs the
// producer callback. The client's death (socket close or pidfd) makes
// blocked writes return ErrPeerGone.
type RingServer struct {
	path string
	auth Authorizer
	cfg  RingConfig
	log  *slog.Logger
	ln   *net.UnixListener
	wg   sync.WaitGroup
}

// NewRingServer prepares a ring server at path.
func NewRingServer(path string, auth Authorizer, cfg RingConfig, log *slog.Logger) *RingServer {
	return &RingServer{path: path, auth: auth, cfg: cfg, log: log}
}

// Listen creates the socket (0700 directory, 0600 socket, stale socket
// replaced, a live one or a non-socket refused), like the control socket.
func (s *RingServer) Listen() error {
	cs := NewServer(s.path, s.auth, s.log)
	if err := cs.Listen(); err != nil {
		return fmt.Errorf("ring %w", err)
	}
	s.ln = cs.ln
	return nil
}

// Serve accepts clients until ctx is done. produce runs in its own
// goroutine per client; the producer is closed when it returns.
func (s *RingServer) Serve(ctx context.Context, produce func(ctx context.Context, peer Peer, p *Producer)) error {
	if s.ln == nil {
		return errors.New("ring socket: Serve before Listen")
	}
	return acceptLoop(ctx, s.ln, &s.wg, "ring socket", func(c *net.UnixConn) {
		defer c.Close()
		peer, p, err := ServeRingConn(c, s.auth, s.cfg)
		if err != nil {
			s.log.Warn("ring: handshake failed", "err", err)
			return
		}
		defer p.Close()
		produce(ctx, peer, p)
	})
}

// ServeRingConn runs the server side of the handshake on an accepted
// connection: identify, authorize, create the ring, send it. The returned
// producer watches the peer (pidfd and a dup of the socket).
func ServeRingConn(c *net.UnixConn, auth Authorizer, cfg RingConfig) (Peer, *Producer, error) {
	peer, err := PeerOf(c)
	if err != nil {
		return peer, nil, fmt.Errorf("identify peer: %w", err)
	}
	c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	defer c.SetWriteDeadline(time.Time{})
	if err := auth(peer, RingMethod); err != nil {
		b, _ := json.Marshal(ringHello{Error: "permission denied: " + err.Error()})
		WriteFrame(c, b)
		return peer, nil, fmt.Errorf("pid %d uid %d refused: %w", peer.PID, peer.UID, err)
	}
	p, err := NewProducer(cfg)
	if err != nil {
		b, _ := json.Marshal(ringHello{Error: err.Error()})
		WriteFrame(c, b)
		return peer, nil, err
	}
	b, _ := json.Marshal(ringHello{Params: p.Params()})
	var fr bytes.Buffer
	WriteFrame(&fr, b)
	memfd, efd := p.FDs()
	if _, _, err := c.WriteMsgUnix(fr.Bytes(), unix.UnixRights(memfd, efd), nil); err != nil {
		p.Close()
		return peer, nil, fmt.Errorf("send ring fds: %w", err)
	}
	if err := watchPeer(&p.ring, c, peer); err != nil {
		p.Close()
		return peer, nil, err
	}
	return peer, p, nil
}

// watchPeer adds a dup of the socket and a pidfd of peer to r's watch list.
func watchPeer(r *ring, c *net.UnixConn, peer Peer) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var dfd int
	var derr error
	raw.Control(func(fd uintptr) { dfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) })
	if derr != nil {
		return fmt.Errorf("dup socket: %w", derr)
	}
	r.AddPeerWatch(dfd)
	if peer.PID > 0 {
		// pidfd_open can race with pid reuse; the socket watch covers
		// that case (the socket dies with the real peer).
		if pfd, err := unix.PidfdOpen(int(peer.PID), unix.PIDFD_NONBLOCK); err == nil {
			r.AddPeerWatch(pfd)
		}
	}
	return nil
}

// DialRing connects to a RingServer at path, receives the ring and
// attaches to it. serverAuth, if not nil, checks the server's credentials
// (e.g. that it runs as root) before anything is accepted. The consumer
// notices the producer's death through a pidfd and the socket.
func DialRing(ctx context.Context, path string, serverAuth Authorizer, cfg RingConfig) (*Consumer, Peer, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, Peer{}, fmt.Errorf("connect to ring at %s: %w", path, err)
	}
	c := nc.(*net.UnixConn)
	defer c.Close() // the consumer keeps its own dup
	return ReceiveRing(ctx, c, serverAuth, cfg)
}

// ReceiveRing runs the client side of the handshake on a connected socket
// (DialRing's, or one end of a socketpair shared with a child process):
// identify and check the server, receive the memfd and eventfd, attach.
// c stays the caller's; the consumer watches a dup of it and a pidfd of
// the server, and c may go on carrying other traffic.
func ReceiveRing(ctx context.Context, c *net.UnixConn, serverAuth Authorizer, cfg RingConfig) (*Consumer, Peer, error) {
	peer, err := PeerOf(c)
	if err != nil {
		return nil, peer, fmt.Errorf("identify ring server: %w", err)
	}
	if serverAuth != nil {
		if err := serverAuth(peer, RingMethod); err != nil {
			return nil, peer, fmt.Errorf("ring server pid %d uid %d not trusted: %w", peer.PID, peer.UID, err)
		}
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetReadDeadline(dl)
	} else {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
	}
	defer c.SetReadDeadline(time.Time{})
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, peer, fmt.Errorf("receive ring: %w", err)
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, peer, fmt.Errorf("receive ring: %w", err)
		}
		for _, m := range msgs {
			if f, err := unix.ParseUnixRights(&m); err == nil {
				fds = append(fds, f...)
			}
		}
	}
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	if flags&unix.MSG_CTRUNC != 0 {
		closeAll()
		return nil, peer, errors.New("receive ring: control message truncated (too many fds)")
	}
	b, err := ReadFrame(bytes.NewReader(buf[:n]))
	if err != nil {
		closeAll()
		return nil, peer, fmt.Errorf("receive ring: %w", err)
	}
	var h ringHello
	if err := json.Unmarshal(b, &h); err != nil {
		closeAll()
		return nil, peer, fmt.Errorf("receive ring: malformed hello: %w", err)
	}
	if h.Error != "" {
		closeAll()
		return nil, peer, fmt.Errorf("ring server: %s", h.Error)
	}
	if len(fds) != 2 {
		closeAll()
		return nil, peer, fmt.Errorf("receive ring: got %d fds, want memfd and eventfd", len(fds))
	}
	if !fdIs(fds[1], "anon_inode:[eventfd]") {
		closeAll()
		return nil, peer, errors.New("receive ring: second fd is not an eventfd")
	}
	unix.SetNonblock(fds[1], true)
	cons, err := Attach(fds[0], fds[1], h.Params, cfg)
	if err != nil {
		return nil, peer, err
	}
	if err := watchPeer(&cons.ring, c, peer); err != nil {
		cons.Close()
		return nil, peer, err
	}
	return cons, peer, nil
}

func fdIs(fd int, target string) bool {
	var b [64]byte
	n, err := unix.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd), b[:])
	return err == nil && string(b[:n]) == target
}
