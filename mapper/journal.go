package mapper

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Entry is one journaled action: written as an intent before the executor
// acts, completed with its outcome after. An entry left without an outcome
// after a crash is an action that may or may not have happened; the next
// leader reconciles it against the host before acting.
type Entry struct {
	Seq     uint64    `json:"seq"`
	Time    time.Time `json:"time"`
	Epoch   uint64    `json:"epoch"`
	VM      string    `json:"vm"`
	Kind    string    `json:"kind"`
	Target  string    `json:"target"`
	Value   string    `json:"value"`
	Reason  string    `json:"reason"`
	Outcome string    `json:"outcome,omitempty"` // "" while pending
	Detail  string    `json:"detail,omitempty"`
	Done    time.Time `json:"done,omitempty"`
}

var (
	entriesBucket = []byte("journal")
	metaBucket    = []byte("meta")
	auditHeadKey  = []byte("audit_head")
)

// Journal is the durable record of intents and outcomes, a bbolt file
// (0600, never opened through a symlink). Every Intent and Outcome is one
// fsynced transaction.
type Journal struct{ db *bolt.DB }

// OpenJournal opens (creating) the journal at path.
func OpenJournal(path string) (*Journal, error) {
	if st, err := os.Lstat(path); err == nil && st.Mode()&os.ModeSymlink != 0 {
		return nil, fmt.Errorf("journal: %s is a symlink; refusing", path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("journal: open %s: %w", path, err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists(entriesBucket); err != nil {
			return err
		}
		_, err := tx.CreateBucketIfNotExists(metaBucket)
		return err
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("journal: %w", err)
	}
	return &Journal{db: db}, nil
}

func key(seq uint64) []byte {
	var k [8]byte
	binary.BigEndian.PutUint64(k[:], seq)
	return k[:]
}

// Intent records e before it is acted on and returns its sequence number.
func (j *Journal) Intent(e Entry) (uint64, error) {
	seqs, err := j.Intents([]Entry{e})
	if err != nil {
		return 0, err
	}
	return seqs[0], nil
}

// Intents records a plan's entries in one durable transaction.
func (j *Journal) Intents(es []Entry) ([]uint64, error) {
	seqs := make([]uint64, len(es))
	err := j.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(entriesBucket)
		for i, e := range es {
			seq, err := b.NextSequence()
			if err != nil {
				return err
			}
			e.Seq, e.Outcome, e.Detail, e.Done = seq, "", "", time.Time{}
			v, err := json.Marshal(e)
			if err != nil {
				return err
			}
			if err := b.Put(key(seq), v); err != nil {
				return err
			}
			seqs[i] = seq
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("journal: intent: %w", err)
	}
	return seqs, nil
}

// Completion is the outcome of one journaled intent.
type Completion struct {
	Seq     uint64
	Outcome string
	Detail  string
	At      time.Time
}

// ErrNoEntry is returned for an unknown sequence number.
var ErrNoEntry = errors.New("journal: no such entry")

// Outcome completes the entry seq.
func (j *Journal) Outcome(seq uint64, outcome, detail string, at time.Time) error {
	return j.Outcomes([]Completion{{Seq: seq, Outcome: outcome, Detail: detail, At: at}})
}

// Outcomes completes several entries in one durable transaction.
func (j *Journal) Outcomes(cs []Completion) error {
	err := j.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(entriesBucket)
		for _, c := range cs {
			if c.Outcome == "" {
				return fmt.Errorf("entry %d: empty outcome", c.Seq)
			}
			v := b.Get(key(c.Seq))
			if v == nil {
				return fmt.Errorf("%w: %d", ErrNoEntry, c.Seq)
			}
			var e Entry
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("entry %d corrupt: %w", c.Seq, err)
			}
			e.Outcome, e.Detail, e.Done = c.Outcome, c.Detail, c.At
			nv, err := json.Marshal(e)
			if err != nil {
				return err
			}
			if err := b.Put(key(c.Seq), nv); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("journal: outcome: %w", err)
	}
	return nil
}

// Pending lists the intents without an outcome, oldest first.
func (j *Journal) Pending() ([]Entry, error) {
	var out []Entry
	err := j.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(entriesBucket).ForEach(func(k, v []byte) error {
			var e Entry
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("entry %x corrupt: %w", k, err)
			}
			if e.Outcome == "" {
				out = append(out, e)
			}
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	return out, nil
}

// Close closes the file.
func (j *Journal) Close() error { return j.db.Close() }

// AuditHead is the audit chain's tip as last recorded with SetAuditHead.
type AuditHead struct {
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"`
}

// SetAuditHead records the audit log's tip (one fsynced transaction), so
// that a log whose tail was cut — with its head file rewritten to match —
// no longer reaches it.
func (j *Journal) SetAuditHead(h AuditHead) error {
	b, err := json.Marshal(h)
	if err != nil {
		return err
	}
	return j.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(metaBucket).Put(auditHeadKey, b) })
}

// AuditHead returns the recorded audit tip; ok is false when none is.
func (j *Journal) AuditHead() (h AuditHead, ok bool, err error) {
	err = j.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(metaBucket).Get(auditHeadKey)
		if b == nil {
			return nil
		}
		if err := json.Unmarshal(b, &h); err != nil {
			return fmt.Errorf("journal: audit head: %w", err)
		}
		ok = true
		return nil
	})
	return h, ok, err
}
