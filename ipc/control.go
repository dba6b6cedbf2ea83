package ipc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// MaxRequest bounds one control request; larger frames are refused
// before they are decoded.
const MaxRequest = 64 << 10

// maxConnsPerUID bounds the concurrent control connections of one
// non-root uid, so that a user the socket lets in cannot exhaust arsd.
const maxConnsPerUID = 16

// maxPeerGroups bounds the supplementary groups read for a peer.
const maxPeerGroups = 1 << 16

var methodName = regexp.MustCompile(`^[a-z][a-z0-9._-]{0,63}$`)

// Request is one control call. Unknown fields are rejected (DecodeRequest).
type Request struct {
	Method string          `json:"method"`
	Params json.RawMessage `json:"params,omitempty"`
}

// Response answers a Request.
type Response struct {
	Result json.RawMessage `json:"result,omitempty"`
	Error  string          `json:"error,omitempty"`
}

// Peer identifies the process on the other end of a connection, as the
// kernel recorded it when it connected (SO_PEERCRED, SO_PEERGROUPS).
type Peer struct {
	PID int32
	UID uint32
	GID uint32
	// Groups are the peer's supplementary groups.
	Groups []uint32
}

// String names the peer for logs and audit records.
func (p Peer) String() string { return fmt.Sprintf("uid=%d gid=%d pid=%d", p.UID, p.GID, p.PID) }

// Handler serves one method.
type Handler func(ctx context.Context, peer Peer, params json.RawMessage) (any, error)

// Authorizer decides whether peer may call method at all; it runs before
// the handler, which may decide further (arsd checks its policy per VM
// there). RootOnly is the default.
type Authorizer func(peer Peer, method string) error

// RootOnly allows uid 0 and refuses everybody else.
func RootOnly(peer Peer, method string) error {
	if peer.UID != 0 {
		return fmt.Errorf("uid %d may not call %s (root only)", peer.UID, method)
	}
	return nil
}

// Server is the control socket.
type Server struct {
	path     string
	auth     Authorizer
	handlers map[string]Handler
	log      *slog.Logger
	ln       *net.UnixListener
	wg       sync.WaitGroup
	shared   bool
	connsMu  sync.Mutex
	conns    map[uint32]int
}

// NewServer prepares a server at path; Register handlers, then Serve.
func NewServer(path string, auth Authorizer, log *slog.Logger) *Server {
	return &Server{path: path, auth: auth, handlers: map[string]Handler{}, log: log}
}

// Register adds a method.
func (s *Server) Register(method string, h Handler) { s.handlers[method] = h }

// SetShared chooses who can reach the socket, before Listen. Not shared
// (the default): the socket is 0600, so only root can connect. Shared:
// the socket is 0666 and its directory searchable (g+x, o+x) but not
// listable nor writable by others; every caller is then identified with
// SO_PEERCRED and the Authorizer and handlers decide what it may do.
func (s *Server) SetShared(shared bool) { s.shared = shared }

// Listen creates the socket (see SetShared for its mode) in a directory
// owned by arsd's user that group and others cannot write (created 0700
// when absent), replacing a stale socket file (never a non-socket).
func (s *Server) Listen() error {
	dir := filepath.Dir(s.path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if err := checkSocketDir(dir, s.shared); err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if st, err := os.Lstat(s.path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("control socket: %s exists and is not a socket; refusing to remove it", s.path)
		}
		if c, err := net.DialTimeout("unix", s.path, 200*time.Millisecond); err == nil {
			c.Close()
			return fmt.Errorf("control socket: %s is in use by another arsd", s.path)
		}
		if err := os.Remove(s.path); err != nil {
			return fmt.Errorf("control socket: remove stale %s: %w", s.path, err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: s.path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	mode := os.FileMode(0o600)
	if s.shared {
		mode = 0o666
	}
	if err := os.Chmod(s.path, mode); err != nil {
		ln.Close()
		return fmt.Errorf("control socket: %w", err)
	}
	s.ln = ln
	return nil
}

// Reshare changes, after Listen, who can reach the socket (see
// SetShared): the socket's mode, and the directory made searchable when
// shared. Connections already open stay; what they may do is decided per
// call.
func (s *Server) Reshare(shared bool) error {
	if s.ln == nil {
		s.shared = shared
		return nil
	}
	if err := checkSocketDir(filepath.Dir(s.path), shared); err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	mode := os.FileMode(0o600)
	if shared {
		mode = 0o666
	}
	if err := os.Chmod(s.path, mode); err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	s.shared = shared
	return nil
}

// checkSocketDir refuses a directory that is a symlink, not owned by the
// effective user, or writable by group or others (someone else could
// replace the socket); shared makes it searchable by everyone.
func checkSocketDir(dir string, shared bool) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory (mode %v); refusing it", dir, fi.Mode().Type())
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("%s: no owner information", dir)
	}
	if euid := uint32(os.Geteuid()); st.Uid != euid {
		return fmt.Errorf("%s is owned by uid %d, not %d; refusing to put the socket there", dir, st.Uid, euid)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("%s is writable by group or others (mode %04o); refusing to put the socket there", dir, fi.Mode().Perm())
	}
	if shared && fi.Mode().Perm()&0o011 != 0o011 {
		if err := os.Chmod(dir, fi.Mode().Perm()|0o011); err != nil {
			return fmt.Errorf("make %s searchable: %w", dir, err)
		}
	}
	return nil
}

// Serve accepts connections until ctx is done.
func (s *Server) Serve(ctx context.Context) error {
	if s.ln == nil {
		return errors.New("control socket: Serve before Listen")
	}
	return acceptLoop(ctx, s.ln, &s.wg, "control socket", func(c *net.UnixConn) { s.handle(ctx, c) })
}

// acceptLoop accepts on ln until ctx is done, running handle for each
// connection in its own goroutine tracked by wg; it returns once every
// handler has returned (nil when ctx ended it).
func acceptLoop(ctx context.Context, ln *net.UnixListener, wg *sync.WaitGroup, what string, handle func(*net.UnixConn)) error {
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			wg.Wait()
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("%s: accept: %w", what, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			handle(c)
		}()
	}
}

// PeerOf reads SO_PEERCRED of a Unix connection.
func PeerOf(c *net.UnixConn) (Peer, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return Peer{}, err
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Peer{}, err
	}
	if serr != nil {
		return Peer{}, fmt.Errorf("SO_PEERCRED: %w", serr)
	}
	p := Peer{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}
	if err := raw.Control(func(fd uintptr) { p.Groups, serr = peerGroups(int(fd)) }); err != nil {
		return Peer{}, err
	}
	if serr != nil {
		return Peer{}, fmt.Errorf("SO_PEERGROUPS: %w", serr)
	}
	return p, nil
}

// peerGroups reads SO_PEERGROUPS: the supplementary groups the peer had
// when it connected (none on kernels without it).
func peerGroups(fd int) ([]uint32, error) {
	buf := make([]uint32, 32)
	for {
		n := uint32(len(buf) * 4)
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		switch {
		case e == unix.ERANGE && int(n/4) > len(buf) && n/4 <= maxPeerGroups:
			buf = make([]uint32, n/4)
		case e == unix.ENOPROTOOPT:
			return nil, nil // kernel before 4.13: primary group only
		case e != 0:
			return nil, e
		default:
			return append([]uint32(nil), buf[:n/4]...), nil
		}
	}
}

// admit counts a connection of uid; false when uid already holds
// maxConnsPerUID (root is not limited).
func (s *Server) admit(uid uint32) bool {
	if uid == 0 {
		return true
	}
	s.connsMu.Lock()
	defer s.connsMu.Unlock()
	if s.conns == nil {
		s.conns = map[uint32]int{}
	}
	if s.conns[uid] >= maxConnsPerUID {
		return false
	}
	s.conns[uid]++
	return true
}

func (s *Server) release(uid uint32) {
	if uid == 0 {
		return
	}
	s.connsMu.Lock()
	defer s.connsMu.Unlock()
	if s.conns[uid]--; s.conns[uid] <= 0 {
		delete(s.conns, uid)
	}
}

// DecodeRequest decodes one control request strictly: at most MaxRequest
// bytes, one JSON object, no unknown fields, no trailing data, a method
// name of lower-case letters, digits and ._- (at most 64), params absent,
// null or a JSON object.
func DecodeRequest(b []byte) (Request, error) {
	var req Request
	if len(b) > MaxRequest {
		return req, fmt.Errorf("request of %d bytes, larger than %d", len(b), MaxRequest)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return Request{}, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return Request{}, errors.New("trailing data after the request object")
	}
	if !methodName.MatchString(req.Method) {
		return Request{}, fmt.Errorf("bad method name %q", truncate(req.Method, 64))
	}
	if p := bytes.TrimSpace(req.Params); len(p) > 0 && !bytes.Equal(p, []byte("null")) && p[0] != '{' {
		return Request{}, errors.New("params must be a JSON object")
	}
	return req, nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// DecodeParams decodes a request's params strictly into v: unknown
// fields are an error naming them, trailing data is refused. Absent or
// null params leave v as it is.
func DecodeParams(params json.RawMessage, v any) error {
	if p := bytes.TrimSpace(params); len(p) == 0 || bytes.Equal(p, []byte("null")) {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(params))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("bad params: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("bad params: trailing data")
	}
	return nil
}

func (s *Server) handle(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	peer, err := PeerOf(c)
	if err != nil {
		s.log.Warn("control: cannot identify peer", "err", err)
		return
	}
	if !s.admit(peer.UID) {
		s.log.Warn("control: too many connections from one uid; closing", "uid", peer.UID, "pid", peer.PID, "max", maxConnsPerUID)
		return
	}
	defer s.release(peer.UID)
	for {
		c.SetReadDeadline(time.Now().Add(5 * time.Minute))
		b, err := ReadFrame(c)
		if err != nil {
			if errors.Is(err, ErrFrameTooLarge) {
				s.log.Warn("control: oversized frame; closing", "peer", peer.String(), "err", err)
			}
			return
		}
		resp := s.call(ctx, peer, b)
		out, err := json.Marshal(resp)
		if err != nil {
			out, _ = json.Marshal(Response{Error: "encode response: " + err.Error()})
		}
		c.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if err := WriteFrame(c, out); err != nil {
			return
		}
	}
}

func (s *Server) call(ctx context.Context, peer Peer, b []byte) Response {
	req, err := DecodeRequest(b)
	if err != nil {
		return Response{Error: "malformed request: " + err.Error()}
	}
	h, ok := s.handlers[req.Method]
	if !ok {
		return Response{Error: fmt.Sprintf("unknown method %q", req.Method)}
	}
	if err := s.auth(peer, req.Method); err != nil {
		s.log.Warn("control: denied", "pid", peer.PID, "uid", peer.UID, "gid", peer.GID, "method", req.Method, "reason", err)
		return Response{Error: "permission denied: " + err.Error()}
	}
	res, err := h(ctx, peer, req.Params)
	if err != nil {
		return Response{Error: err.Error()}
	}
	raw, err := json.Marshal(res)
	if err != nil {
		return Response{Error: "encode result: " + err.Error()}
	}
	return Response{Result: raw}
}

// Call dials the control socket, sends one request and decodes the result
// into out (which may be nil).
func Call(ctx context.Context, path, method string, params, out any) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if errors.Is(err, unix.EACCES) {
			return fmt.Errorf("connect to arsd at %s: %w (the socket admits root only unless arsd's control policy grants you a role or VMs; see docs/SECURITY.md)", path, err)
		}
		return fmt.Errorf("connect to arsd at %s: %w", path, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	} else {
		conn.SetDeadline(time.Now().Add(10 * time.Second))
	}
	req := Request{Method: method}
	if params != nil {
		if req.Params, err = json.Marshal(params); err != nil {
			return fmt.Errorf("encode params: %w", err)
		}
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	if err := WriteFrame(conn, b); err != nil {
		return err
	}
	rb, err := ReadFrame(conn)
	if err != nil {
		return fmt.Errorf("read reply from arsd: %w", err)
	}
	var resp Response
	if err := json.Unmarshal(rb, &resp); err != nil {
		return fmt.Errorf("malformed reply from arsd: %w", err)
	}
	if resp.Error != "" {
		return fmt.Errorf("arsd: %s", resp.Error)
	}
	if out != nil {
		if err := json.Unmarshal(resp.Result, out); err != nil {
			return fmt.Errorf("decode %s result: %w", method, err)
		}
	}
	return nil
}
