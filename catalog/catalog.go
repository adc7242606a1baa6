// Package catalog is the service's transactional record of what the
// engine does not keep itself: shadow copy sets (their FSRVP state,
// context and members) and exposures (share mappings: which snapshot is
// shown where). It is a bbolt file; every change is one transaction, so
// the catalog survives restarts and unclean stops whole. At start the
// service reconciles it with the providers (the engine's own metadata is
// the truth about which snapshots exist): records of snapshots that are
// gone are dropped, and exposures are made again.
package catalog

import (
	"encoding/json"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Buckets.
const (
	Sets      = "sets"
	Exposures = "exposures"
	Storage   = "storage" // storage associations changed through the API
	Writers   = "writers" // writer states and recent history
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
		for _, b := range []string{Sets, Exposures, Storage, Writers} {
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
	return c.db.Update(func(tx *bolt.Tx) error { return tx.Bucket([]byte(bucket)).Put([]byte(id), b) })
}

// Delete removes id from bucket.
func (c *Catalog) Delete(bucket, id string) error {
	return c.db.Update(func(tx *bolt.Tx) error { return tx.Bucket([]byte(bucket)).Delete([]byte(id)) })
}

// Each calls fn with every record of bucket, in key order; records that
// do not decode are reported to bad and skipped. fn and bad run inside a
// read transaction: they must not change the catalog.
func Each[T any](c *Catalog, bucket string, fn func(id string, v T), bad func(id string, err error)) error {
	return c.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucket)).ForEach(func(k, raw []byte) error {
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
