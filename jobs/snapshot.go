package jobs

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"umbra/api/umbrav1"
	"umbra/jobs/retention"
)

// A snapshot job keeps a timeline: each run takes one snapshot set of
// its volumes through the coordinator (with the writers frozen when
// writers = true), then deletes the job's snapshots that the keep
// limits no longer keep (snapper's timeline cleanup). Its snapshots are
// named NAME-TIME; snapshots named otherwise are never its to delete.
func init() {
	register(&Kind{Name: "snapshot", Check: checkSnapshot, Run: runSnapshot})
}

func checkSnapshot(d *Def) error {
	if err := unused(d, "repo", "password_file", "full", "reverify_days", "sample", "to", "to_password_file"); err != nil {
		return err
	}
	if err := needVolumes(d); err != nil {
		return err
	}
	if d.Keep.Last != 0 {
		return fieldErr(d, "keep.last", "a snapshot timeline caps its number with keep.count")
	}
	l, err := limits(d)
	if err != nil {
		return err
	}
	if err := l.Validate(); err != nil {
		return fieldErr(d, "keep", "%w", err)
	}
	return nil
}

// DefaultMinAge keeps a timeline's snapshots younger than this whatever
// the limits say (snapper's TIMELINE_MIN_AGE), so that one just taken is
// not deleted before its period is over.
const DefaultMinAge = 30 * time.Minute

func limits(d *Def) (retention.Limits, error) {
	k := d.Keep
	l := retention.Limits{Hourly: k.Hourly, Daily: k.Daily, Weekly: k.Weekly, Monthly: k.Monthly, Yearly: k.Yearly, Count: k.Count, MinAge: DefaultMinAge}
	if k.MinAge != "" {
		v, err := time.ParseDuration(k.MinAge)
		if err != nil || v < 0 {
			return l, fieldErr(d, "keep.min_age", "%q: want a duration such as 30m (0s: none)", k.MinAge)
		}
		l.MinAge = v
	}
	return l, nil
}

// snapshotTime is the time part of a job's snapshot IDs (UTC).
const snapshotTime = "20060102T150405.000Z"

var snapshotTimeRE = `[0-9]{8}T[0-9]{6}\.[0-9]{3}Z`

func runSnapshot(ctx context.Context, env *Env, d *Def, out *Outcome) error {
	persistent := d.Persistent == nil || *d.Persistent
	now := env.Now() // periods are read on the service's wall clock
	id := d.Name + "-" + now.UTC().Format(snapshotTime)
	set, err := env.API.CreateSnapshotSet(ctx, &umbrav1.CreateSnapshotSetRequest{
		Volumes: d.Volumes, Writers: d.Writers, Persistent: persistent, Id: id})
	if err != nil {
		out.Detail = "no snapshot taken"
		return fmt.Errorf("snapshot %s: %w", strings.Join(d.Volumes, ","), err)
	}
	deleted, kept, protected, err := snapshotRetention(ctx, env, d, now)
	out.Detail = fmt.Sprintf("took %s (set %s); kept %d, deleted %d", id, set.SetId, kept, len(deleted))
	if len(protected) > 0 {
		out.Detail += "; not deleted, in use: " + strings.Join(protected, "; ")
	}
	return err
}

// snapshotRetention deletes the job's snapshots its limits do not keep.
// A snapshot that is exposed, a backup's base, in use or part of a
// shadow copy set in progress is protected: kept, and named.
func snapshotRetention(ctx context.Context, env *Env, d *Def, now time.Time) (deleted []string, kept int, protected []string, err error) {
	mine := regexp.MustCompile("^" + regexp.QuoteMeta(d.Name) + "-(" + snapshotTimeRE + ")$")
	busy, err := setsInProgress(ctx, env)
	if err != nil {
		return nil, 0, nil, err
	}
	// One item per snapshot ID: the set's members on every volume go
	// together, protected if any of them is.
	type member struct {
		sets  map[string]bool
		vols  []string
		why   []string
		taken time.Time
	}
	byID := map[string]*member{}
	var items []retention.Item
	for _, vol := range d.Volumes {
		list, err := env.API.ListSnapshots(ctx, &umbrav1.ListSnapshotsRequest{Volume: vol})
		if err != nil {
			return nil, 0, nil, fmt.Errorf("list snapshots of %s: %w", vol, err)
		}
		for _, sn := range list.Snapshots {
			m := mine.FindStringSubmatch(sn.Id)
			if m == nil {
				continue
			}
			t, err := time.Parse(snapshotTime, m[1])
			if err != nil {
				continue
			}
			e := byID[sn.Id]
			if e == nil {
				e = &member{sets: map[string]bool{}, taken: t}
				byID[sn.Id] = e
			}
			e.vols = append(e.vols, vol)
			if sn.SetId != "" {
				e.sets[sn.SetId] = true
			}
			if sn.State == "backup-base" {
				e.why = append(e.why, vol+": a backup's base")
			}
			if len(sn.Users) > 0 {
				e.why = append(e.why, vol+": in use ("+strings.Join(sn.Users, ", ")+")")
			}
			if s := busy[vol+"@"+sn.Id]; s != "" {
				e.why = append(e.why, vol+": "+s)
			}
		}
	}
	for id, e := range byID {
		items = append(items, retention.Item{ID: id, Time: e.taken, Protected: strings.Join(e.why, ", ")})
	}
	slices.SortFunc(items, func(a, b retention.Item) int { return a.Time.Compare(b.Time) })
	l, err := limits(d)
	if err != nil {
		return nil, 0, nil, err
	}
	plan := retention.Plan(l, items, now)
	var errs []error
	for _, dec := range plan {
		id := dec.Item.ID
		e := byID[id]
		switch {
		case dec.Keep:
			kept++
			if dec.Item.Protected != "" {
				protected = append(protected, id+" ("+dec.Item.Protected+")")
			}
			continue
		case e == nil:
			continue
		}
		if err := deleteSnapshot(ctx, env, id, e.vols, e.sets); err != nil {
			// Refused (in use since the listing): kept, and said.
			errs = append(errs, err)
			kept++
			continue
		}
		deleted = append(deleted, id)
	}
	if len(errs) > 0 {
		return deleted, kept, protected, fmt.Errorf("retention: %w", errors.Join(errs...))
	}
	return deleted, kept, protected, nil
}

// deleteSnapshot deletes one of the job's snapshots on every volume: by
// its set when it has exactly one, which deletes all members or none.
func deleteSnapshot(ctx context.Context, env *Env, id string, vols []string, sets map[string]bool) error {
	if len(sets) == 1 {
		for set := range sets {
			_, err := env.API.DeleteSnapshots(ctx, &umbrav1.DeleteSnapshotsRequest{SetId: set})
			if err != nil {
				return fmt.Errorf("delete set %s (%s): %w", set, id, err)
			}
		}
		return nil
	}
	for _, vol := range vols {
		if _, err := env.API.DeleteSnapshots(ctx, &umbrav1.DeleteSnapshotsRequest{Volume: vol, Id: id}); err != nil {
			return fmt.Errorf("delete %s@%s: %w", vol, id, err)
		}
	}
	return nil
}

// setsInProgress names the snapshots (VOLUME@ID) that shadow copy sets
// not yet recovered or aborted use, with the set and its state.
func setsInProgress(ctx context.Context, env *Env) (map[string]string, error) {
	resp, err := env.API.ListShadowCopySets(ctx, &umbrav1.ListShadowCopySetsRequest{})
	if err != nil {
		return nil, fmt.Errorf("list shadow copy sets: %w", err)
	}
	out := map[string]string{}
	for _, s := range resp.Sets {
		if s.State == "recovered" || s.State == "aborted" {
			continue
		}
		for _, sc := range s.ShadowCopies {
			out[sc.Volume+"@"+sc.Snapshot] = fmt.Sprintf("used by shadow copy set %s (%s)", s.Id, s.State)
		}
	}
	return out, nil
}
