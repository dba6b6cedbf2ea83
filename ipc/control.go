package ipc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Request is one control call.
type Request struct {
	Method string          `json:"method"`
	Params json.RawMessage `json:"params,omitempty"`
}

// Response answers a Request.
type Response struct {
	Result json.RawMessage `json:"result,omitempty"`
	Error  string          `json:"error,omitempty"`
}

// Peer identifies the process on the other end of a connection.
type Peer struct {
	PID int32
	UID uint32
	GID uint32
}

// Handler serves one method.
type Handler func(ctx context.Context, peer Peer, params json.RawMessage) (any, error)

// Authorizer decides whether peer may call method. The default allows
// root only; the policy file arrives with the security issue.
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
}

// NewServer prepares a server at path; Register handlers, then Serve.
func NewServer(path string, auth Authorizer, log *slog.Logger) *Server {
	return &Server{path: path, auth: auth, handlers: map[string]Handler{}, log: log}
}

// Register adds a method.
func (s *Server) Register(method string, h Handler) { s.handlers[method] = h }

// Listen creates the socket in a 0700 directory, replacing a stale socket
// file (never a non-socket).
func (s *Server) Listen() error {
	dir := filepath.Dir(s.path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
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
	if err := os.Chmod(s.path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("control socket: %w", err)
	}
	s.ln = ln
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
	return Peer{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}, nil
}

func (s *Server) handle(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	peer, err := PeerOf(c)
	if err != nil {
		s.log.Warn("control: cannot identify peer", "err", err)
		return
	}
	for {
		c.SetReadDeadline(time.Now().Add(5 * time.Minute))
		b, err := ReadFrame(c)
		if err != nil {
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
	var req Request
	if err := json.Unmarshal(b, &req); err != nil {
		return Response{Error: "malformed request: " + err.Error()}
	}
	h, ok := s.handlers[req.Method]
	if !ok {
		return Response{Error: fmt.Sprintf("unknown method %q", req.Method)}
	}
	if err := s.auth(peer, req.Method); err != nil {
		s.log.Warn("control: denied", "pid", peer.PID, "uid", peer.UID, "method", req.Method)
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
