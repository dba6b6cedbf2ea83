package executor

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Record is one audit line: who changed what, from what to what, why, under
// which leader epoch, with what result, chained to the line before it.
type Record struct {
	Seq    uint64    `json:"seq"`
	Time   time.Time `json:"time"`
	Actor  string    `json:"actor"`
	VM     string    `json:"vm"`
	Kind   string    `json:"kind"`
	Target string    `json:"target"`
	Before string    `json:"before"`
	After  string    `json:"after"`
	Reason string    `json:"reason"`
	Epoch  uint64    `json:"epoch"`
	Result string    `json:"result"`
	DryRun bool      `json:"dry_run,omitempty"`
	// Prev is the hex SHA-256 of the previous line's bytes (without its
	// newline); GenesisHash for the first line.
	Prev string `json:"prev"`
}

// GenesisHash is the Prev of the first record.
var GenesisHash = strings.Repeat("0", 64)

// maxAuditLine bounds one line when reading a log back.
const maxAuditLine = 64 << 10

// Head is the chain's tip, kept beside the log in <log>.head so that
// removing whole lines from the end is detected too.
type Head struct {
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"`
}

// AuditLog is an append-only, hash-chained JSON-lines file (mode 0600,
// never opened through a symlink). Each line carries the SHA-256 of the
// previous one; <path>.head holds the last sequence number and hash,
// replaced atomically after every append.
type AuditLog struct {
	mu   sync.Mutex
	f    *os.File
	path string
	head Head
	// Rotated is where an unverifiable previous log was moved ("" if none).
	Rotated string
	// OnSync, when set, is called with the chain's tip after every Sync
	// that wrote records (arsd stores it in the DRM journal as the anchor
	// OpenAuditAnchored checks at the next start).
	OnSync func(Head) error
	dirty  bool // records appended since the last Sync
}

// OpenAudit opens (creating) the audit log at path and resumes its chain.
// A log whose chain does not verify (tampered, truncated, or an older
// format) is never extended and never deleted: it is renamed to
// <path>.unverified-<UTC time> (with its head file), a new chain starts,
// and its first record (kind "audit.rotate") names the moved file and the
// verification error. Rotated then says where the old log went.
func OpenAudit(path string) (*AuditLog, error) { return OpenAuditAnchored(path, nil) }

// OpenAuditAnchored is OpenAudit with an anchor kept outside the log's
// directory files (the DRM journal's copy of the chain's tip): the log
// must reach the anchor's sequence with the anchor's hash. Cutting lines
// from the end and rewriting <path>.head to match is then detected too,
// and the log is moved aside like any other that does not verify. A nil
// anchor checks nothing more than OpenAudit.
func OpenAuditAnchored(path string, anchor *Head) (*AuditLog, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	var rotated string
	var verr error
	head, err := VerifyFile(path)
	if err == nil && anchor != nil && anchor.Seq > 0 {
		err = checkAnchor(path, *anchor)
	}
	if err != nil {
		var ve *VerifyError
		if !errors.As(err, &ve) {
			return nil, err
		}
		verr = err
		rotated = fmt.Sprintf("%s.unverified-%s", path, time.Now().UTC().Format("20060102T150405.000000000Z"))
		if err := os.Rename(path, rotated); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("audit: move unverified log aside: %w", err)
		}
		if err := os.Rename(path+".head", rotated+".head"); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("audit: move unverified head aside: %w", err)
		}
		head = Head{Hash: GenesisHash}
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: open %s: %w", path, err)
	}
	l := &AuditLog{f: f, path: path, head: head, Rotated: rotated}
	if _, err := os.Lstat(path + ".head"); errors.Is(err, os.ErrNotExist) {
		// A head from the first moment: a crash before the first Sync
		// then leaves a head that lags the log (allowed), not a missing
		// one (which reads as tampering and rotates the log).
		if err := writeHead(path, head); err != nil {
			f.Close()
			return nil, err
		}
	}
	if rotated != "" {
		if err := l.Append(Record{Time: time.Now().UTC(), Actor: "arsd", Kind: "audit.rotate", Target: rotated,
			Reason: "previous log did not verify and was moved aside: " + verr.Error(), Result: "rotated"}); err != nil {
			f.Close()
			return nil, err
		}
		if err := l.Sync(); err != nil {
			f.Close()
			return nil, err
		}
	}
	return l, nil
}

// Append chains r to the log and writes it as one line. Seq and Prev are
// set here.
func (l *AuditLog) Append(r Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	r.Seq = l.head.Seq + 1
	r.Prev = l.head.Hash
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("audit: encode: %w", err)
	}
	if _, err := l.f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("audit: write %s: %w", l.path, err)
	}
	sum := sha256.Sum256(b)
	l.head = Head{Seq: r.Seq, Hash: hex.EncodeToString(sum[:])}
	l.dirty = true
	return nil
}

// Sync makes the appended records durable and then records the chain's
// tip in the head file (temp file, fsync, rename). The executor calls it
// once per plan. The head may lag the log after a crash; it may never be
// ahead of it.
func (l *AuditLog) Sync() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.dirty {
		return nil
	}
	if err := l.f.Sync(); err != nil {
		return fmt.Errorf("audit: sync %s: %w", l.path, err)
	}
	if err := writeHead(l.path, l.head); err != nil {
		return err
	}
	l.dirty = false
	if l.OnSync != nil {
		if err := l.OnSync(l.head); err != nil {
			return fmt.Errorf("audit: record the chain's tip elsewhere: %w", err)
		}
	}
	return nil
}

// checkAnchor verifies that the log at path reaches anchor: the record at
// anchor.Seq exists and has anchor.Hash.
func checkAnchor(path string, anchor Head) error {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return &VerifyError{0, fmt.Sprintf("log missing but the journal's anchor says sequence %d", anchor.Seq)}
		}
		return fmt.Errorf("audit: %w", err)
	}
	defer f.Close()
	head, atHash, err := verify(f, anchor.Seq)
	if err != nil {
		return err
	}
	if head.Seq < anchor.Seq {
		return &VerifyError{int(head.Seq) + 1, fmt.Sprintf("log ends at sequence %d but the journal's anchor says %d (lines cut from the end, head file rewritten)", head.Seq, anchor.Seq)}
	}
	if atHash != anchor.Hash {
		return &VerifyError{int(anchor.Seq), "record does not match the journal's anchor (the log was replaced or rewritten)"}
	}
	return nil
}

// Head returns the chain's tip.
func (l *AuditLog) Head() Head {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.head
}

// Close syncs and closes the file.
func (l *AuditLog) Close() error {
	err := l.Sync()
	return errors.Join(err, l.f.Close())
}

func writeHead(path string, h Head) error {
	b, _ := json.Marshal(h)
	tmp := path + ".head.tmp"
	os.Remove(tmp)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("audit: head: %w", err)
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("audit: head: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("audit: head: %w", err)
	}
	f.Close()
	if err := os.Rename(tmp, path+".head"); err != nil {
		return fmt.Errorf("audit: head: %w", err)
	}
	return nil
}

// VerifyError names the first line that breaks the chain.
type VerifyError struct {
	Line   int // 1-based; 0 when the problem is the head file
	Reason string
}

func (e *VerifyError) Error() string {
	if e.Line == 0 {
		return "audit chain: " + e.Reason
	}
	return fmt.Sprintf("audit chain broken at line %d: %s", e.Line, e.Reason)
}

// Verify reads a log and checks every line's sequence and hash link. It
// returns the tip of the chain. It does not know about the head file.
func Verify(r io.Reader) (Head, error) {
	h, _, err := verify(r, 0)
	return h, err
}

// verify also returns the chain's hash after record seq at (if reached).
func verify(r io.Reader, at uint64) (Head, string, error) {
	head := Head{Hash: GenesisHash}
	var atHash string
	br := bufio.NewReaderSize(r, 64<<10)
	for line := 1; ; line++ {
		b, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) || len(b) > maxAuditLine {
			return head, atHash, &VerifyError{line, "line longer than 64 KiB"}
		}
		if errors.Is(err, io.EOF) {
			if len(b) > 0 {
				return head, atHash, &VerifyError{line, "truncated: last line has no newline"}
			}
			return head, atHash, nil
		}
		if err != nil {
			return head, atHash, fmt.Errorf("audit: read: %w", err)
		}
		b = bytes.TrimSuffix(b, []byte("\n"))
		var rec Record
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&rec); err != nil {
			return head, atHash, &VerifyError{line, "not a record: " + err.Error()}
		}
		if rec.Seq != head.Seq+1 {
			return head, atHash, &VerifyError{line, fmt.Sprintf("sequence %d after %d (line removed, reordered or inserted)", rec.Seq, head.Seq)}
		}
		if rec.Prev != head.Hash {
			return head, atHash, &VerifyError{line, "hash of the previous line does not match (a line before it was edited, removed or reordered)"}
		}
		sum := sha256.Sum256(b)
		head = Head{Seq: rec.Seq, Hash: hex.EncodeToString(sum[:])}
		if head.Seq == at {
			atHash = head.Hash
		}
	}
}

// VerifyFile verifies the log at path and, when <path>.head exists, that
// the log reaches the head: the record at the head's sequence must have
// the head's hash (the head may lag the log after a crash, never lead it),
// so lines cut from the end are detected. A missing log with no head is an
// empty, valid chain.
func VerifyFile(path string) (Head, error) {
	var want Head
	haveHead := false
	hb, err := os.ReadFile(path + ".head")
	switch {
	case err == nil:
		if err := json.Unmarshal(hb, &want); err != nil {
			return Head{}, &VerifyError{0, "head file unreadable: " + err.Error()}
		}
		haveHead = true
	case !errors.Is(err, os.ErrNotExist):
		return Head{}, fmt.Errorf("audit: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			if haveHead {
				return Head{}, &VerifyError{0, "log missing but its head file exists (log deleted)"}
			}
			return Head{Hash: GenesisHash}, nil
		}
		return Head{}, fmt.Errorf("audit: %w", err)
	}
	defer f.Close()
	head, atHash, err := verify(f, want.Seq)
	if err != nil {
		return head, err
	}
	if !haveHead {
		if head.Seq == 0 {
			return head, nil
		}
		return head, &VerifyError{0, "head file " + path + ".head is missing"}
	}
	if head.Seq < want.Seq {
		return head, &VerifyError{int(head.Seq) + 1, fmt.Sprintf("log ends at sequence %d but the head says %d (lines cut from the end)", head.Seq, want.Seq)}
	}
	if want.Seq > 0 && atHash != want.Hash {
		return head, &VerifyError{int(want.Seq), "record does not match the head file's hash (edited, or the head was)"}
	}
	return head, nil
}
