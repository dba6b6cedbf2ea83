package executor

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// Record is one audit line: who changed what, from what to what, and why.
type Record struct {
	Time   time.Time `json:"time"`
	VM     string    `json:"vm"`
	Kind   string    `json:"kind"`
	Target string    `json:"target"`
	Before string    `json:"before"`
	After  string    `json:"after"`
	Reason string    `json:"reason"`
	DryRun bool      `json:"dry_run,omitempty"`
}

// AuditLog is an append-only JSON-lines file (mode 0600, never opened
// through a symlink). Hash chaining comes with the security issue.
type AuditLog struct {
	mu sync.Mutex
	f  *os.File
}

// OpenAudit opens (creating) the audit log at path.
func OpenAudit(path string) (*AuditLog, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: open %s: %w", path, err)
	}
	return &AuditLog{f: f}, nil
}

// Append writes one record as a single line.
func (l *AuditLog) Append(r Record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("audit: encode: %w", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, err := l.f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("audit: write %s: %w", l.f.Name(), err)
	}
	return nil
}

// Close closes the file.
func (l *AuditLog) Close() error { return l.f.Close() }
