// Package catalog is the service's transactional record of what the
// engine does not keep itself: shadow copy sets (their FSRVP state,
// context and members) and exposures (share mappings: which snapshot is
// shown where), jobs' state and runs. It is a bbolt file; every change is one transaction, so
// the catalog survives restarts and unclean stops whole. At start the
// service reconciles it with the providers (the engine's own metadata is
// the truth about which snapshots exist): records of snapshots that are
// gone are dropped, and exposures are made again.
package catalog

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Buckets.
const (
	Sets      = "sets"
	Exposures = "exposures"
	Storage   = "storage"  // storage associations changed through the API
	Writers   = "writers"  // writer states and recent history
	Jobs      = "jobs"     // per job: enabled or disabled, last scheduled run
	JobRuns   = "job_runs" // per job (a nested bucket): its runs, by sequence
)

// Catalog is an open catalog file.
type Catalog struct{ db *bolt.DB }

// Open opens (creating) the catalog at path.
func Open(path string) (*Catalog, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open catalog %s: %w (is another umbra serve using this state directory?)", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range []string{Sets, Exposures, Storage, Writers, Jobs, JobRuns} {
			if _, err := tx.CreateBucketIfNotExists([]byte(b)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open catalog %s: %w", path, err)
	}
	return &Catalog{db: db}, nil
}

// Close closes the file.
func (c *Catalog) Close() error { return c.db.Close() }

// Put stores v (as JSON) under id in bucket.
func (c *Catalog) Put(bucket, id string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.db.Update(func(tx *bolt.Tx) error {
		bk, err := bucketOf(tx, bucket)
		if err != nil {
			return err
		}
		return bk.Put([]byte(id), b)
	})
}

// PutAll stores each record of recs (as JSON) in bucket, in one
// transaction.
func (c *Catalog) PutAll(bucket string, recs map[string]any) error {
	return c.db.Update(func(tx *bolt.Tx) error {
		bk, err := bucketOf(tx, bucket)
		if err != nil {
			return err
		}
		for id, v := range recs {
			b, err := json.Marshal(v)
			if err != nil {
				return err
			}
			if err := bk.Put([]byte(id), b); err != nil {
				return err
			}
		}
		return nil
	})
}

// Delete removes id from bucket.
func (c *Catalog) Delete(bucket, id string) error {
	return c.db.Update(func(tx *bolt.Tx) error {
		bk, err := bucketOf(tx, bucket)
		if err != nil {
			return err
		}
		return bk.Delete([]byte(id))
	})
}

// Each calls fn with every record of bucket, in key order; records that
// do not decode are reported to bad and skipped. fn and bad run inside a
// read transaction: they must not change the catalog.
func Each[T any](c *Catalog, bucket string, fn func(id string, v T), bad func(id string, err error)) error {
	return c.db.View(func(tx *bolt.Tx) error {
		bk, err := bucketOf(tx, bucket)
		if err != nil {
			return err
		}
		return bk.ForEach(func(k, raw []byte) error {
			var v T
			if err := json.Unmarshal(raw, &v); err != nil {
				if bad != nil {
					bad(string(k), err)
				}
				return nil
			}
			fn(string(k), v)
			return nil
		})
	})
}

// Get reads id of bucket into v; ok is false when there is no such
// record.
func (c *Catalog) Get(bucket, id string, v any) (ok bool, err error) {
	err = c.db.View(func(tx *bolt.Tx) error {
		bk, err := bucketOf(tx, bucket)
		if err != nil {
			return err
		}
		raw := bk.Get([]byte(id))
		if raw == nil {
			return nil
		}
		ok = true
		return json.Unmarshal(raw, v)
	})
	return ok, err
}

// Logs are bounded, append-only sequences of records: in bucket, one
// nested bucket per group (a job's runs), keyed by a sequence number.

func seqKey(seq uint64) []byte { return binary.BigEndian.AppendUint64(nil, seq) }

// Append stores v as the next record of group in bucket and drops the
// oldest records beyond keep, in one transaction. It returns v's
// sequence number (1, 2, ...; never reused within the group).
func (c *Catalog) Append(bucket, group string, v any, keep int) (uint64, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, err
	}
	var seq uint64
	err = c.db.Update(func(tx *bolt.Tx) error {
		top, err := bucketOf(tx, bucket)
		if err != nil {
			return err
		}
		g, err := top.CreateBucketIfNotExists([]byte(group))
		if err != nil {
			return err
		}
		if seq, err = g.NextSequence(); err != nil {
			return err
		}
		if err := g.Put(seqKey(seq), b); err != nil {
			return err
		}
		if keep <= 0 {
			return nil
		}
		n := 0
		cur := g.Cursor()
		for k, _ := cur.First(); k != nil; k, _ = cur.Next() {
			n++
		}
		if n > keep {
			for k, _ := cur.First(); k != nil && n > keep; k, _ = cur.First() {
				if err := cur.Delete(); err != nil {
					return err
				}
				n--
			}
		}
		return nil
	})
	return seq, err
}

// Replace stores v as record seq of group (which Append made).
func (c *Catalog) Replace(bucket, group string, seq uint64, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.db.Update(func(tx *bolt.Tx) error {
		top, err := bucketOf(tx, bucket)
		if err != nil {
			return err
		}
		g := top.Bucket([]byte(group))
		if g == nil || g.Get(seqKey(seq)) == nil {
			return fmt.Errorf("catalog %s/%s: no record %d", bucket, group, seq)
		}
		return g.Put(seqKey(seq), b)
	})
}

// EachLog calls fn with the records of group in bucket, newest first,
// until fn returns false; records that do not decode are skipped. An
// empty group means every group (each newest first, groups in order).
func EachLog[T any](c *Catalog, bucket, group string, fn func(group string, seq uint64, v T) bool) error {
	return c.db.View(func(tx *bolt.Tx) error {
		top, err := bucketOf(tx, bucket)
		if err != nil {
			return err
		}
		each := func(name []byte, g *bolt.Bucket) bool {
			cur := g.Cursor()
			for k, raw := cur.Last(); k != nil; k, raw = cur.Prev() {
				var v T
				if len(k) != 8 || json.Unmarshal(raw, &v) != nil {
					continue
				}
				if !fn(string(name), binary.BigEndian.Uint64(k), v) {
					return false
				}
			}
			return true
		}
		if group != "" {
			if g := top.Bucket([]byte(group)); g != nil {
				each([]byte(group), g)
			}
			return nil
		}
		cur := top.Cursor()
		for k, v := cur.First(); k != nil; k, v = cur.Next() {
			if v != nil {
				continue // not a nested bucket
			}
			if !each(k, top.Bucket(k)) {
				break
			}
		}
		return nil
	})
}

// ErrNoBucket is a bucket name the catalog does not have.
var ErrNoBucket = errors.New("no such catalog bucket")

// bucketOf is the top-level bucket name of tx: one of the constants
// above, which Open creates; any other name is an error, not a nil
// bucket.
func bucketOf(tx *bolt.Tx, name string) (*bolt.Bucket, error) {
	if b := tx.Bucket([]byte(name)); b != nil {
		return b, nil
	}
	return nil, fmt.Errorf("catalog bucket %q: %w: use one of the catalog package's bucket constants", name, ErrNoBucket)
}
