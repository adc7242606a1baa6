package backup

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// The last verify of each image is kept in the repository, beside the
// image, as verified/IMAGE: it goes where the image goes (deleted with
// it), is read by anything that reads the repository (`umbra images
// list` without a service), and outlives the service that ran the
// verify. A copy of an image in another repository starts unverified:
// its chunks there are other bytes.

// VerifyState is what the last verify that checked an image found. A
// whole verify records each image it checks, good or damaged; a sampled
// one records only the damage it finds (a sample shows no image good).
type VerifyState struct {
	Time   time.Time `json:"time"`
	Result string    `json:"result"`           // VerifyGood or VerifyDamaged
	Sample float64   `json:"sample,omitempty"` // the fraction a sampled verify that found the damage checked
}

// Results of a VerifyState.
const (
	VerifyGood    = "good"
	VerifyDamaged = "damaged"
)

func verifiedName(id string) string { return "verified/" + id }

// VerifyStates returns the recorded verify state of each image that has
// one, by image ID. A record that does not read is left out and named
// in errs (the image then counts as never verified).
func (r *Repo) VerifyStates(ctx context.Context) (map[string]VerifyState, []error) {
	names, err := r.be.List(ctx, "verified/")
	if err != nil {
		return nil, []error{fmt.Errorf("list verify records: %w", err)}
	}
	out := make(map[string]VerifyState, len(names))
	var errs []error
	for _, n := range names {
		b, err := r.getObject(ctx, n)
		if err != nil {
			errs = append(errs, fmt.Errorf("verify record %s: %w", n, err))
			continue
		}
		var s VerifyState
		if err := json.Unmarshal(b, &s); err != nil || (s.Result != VerifyGood && s.Result != VerifyDamaged) {
			errs = append(errs, fmt.Errorf("verify record %s: %w: not a verify state", n, ErrCorrupt))
			continue
		}
		out[strings.TrimPrefix(n, "verified/")] = s
	}
	return out, errs
}

// recordVerify writes the verify states a verify with opts found for the
// images it checked (checked: their IDs; bad: those found damaged).
func (r *Repo) recordVerify(ctx context.Context, opts VerifyOptions, checked []string, bad map[string]bool) error {
	at := opts.Time
	if at.IsZero() {
		at = time.Now()
	}
	at = at.UTC()
	for _, id := range checked {
		s := VerifyState{Time: at, Result: VerifyGood}
		if bad[id] {
			s.Result = VerifyDamaged
			if opts.sampled() {
				s.Sample = opts.Sample
			}
		} else if opts.sampled() {
			continue
		}
		if !validImageID(id) {
			continue
		}
		b, _ := json.Marshal(s)
		if err := r.putObject(ctx, verifiedName(id), b); err != nil {
			return fmt.Errorf("record the verify of image %s: %w", id, err)
		}
	}
	return r.be.Sync(ctx)
}

// forgetVerify deletes the verify records of deleted images; one left
// behind (a crash, an older Umbra) names no image and is never read.
func (r *Repo) forgetVerify(ctx context.Context, ids []string) {
	for _, id := range ids {
		r.be.Delete(ctx, verifiedName(id)) // absent when never verified
	}
}
