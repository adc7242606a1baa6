// Package retention decides which snapshots (or images) of a timeline
// to keep and which to delete, the way snapper's timeline cleanup does;
// it only plans, the caller deletes.
//
// The rules, as snapper's (client/cleanup.cc): walking the items from
// the youngest to the oldest, an item is kept by the hourly rule if it
// is the first (oldest) item of its hour and fewer than Limits.Hourly
// hours have had their first item kept so far; likewise daily, weekly
// (weeks start on Monday), monthly and yearly. In other words each
// rule keeps the oldest item of each of its N most recent periods that
// have items. One item may be kept by several rules at once, and it
// then takes a place in each of them. Periods are read on the wall
// clock of now's location.
//
// Beyond snapper:
//   - Protected items (Item.Protected non-empty: exposed, the base of a
//     backup, used by a set in progress) are always kept and reported
//     with their reason. They are set aside before the rules run: they
//     take no place in any rule and do not count against Count, so
//     protecting an item never makes Plan delete another one.
//   - Count, if above 0, caps how many unprotected items are kept: of
//     those the rules keep, the oldest beyond Count are deleted. 0 means
//     no cap. Windows' shadow copies keep at most 64 this way.
//   - MinAge keeps every item younger than now-MinAge whatever the
//     rules say (snapper's TIMELINE_MIN_AGE, 30 minutes there), so a
//     snapshot just taken is not deleted before its period is over. It
//     counts against Count but is never deleted for it.
//
// Items at the same instant are ordered by ID, so the plan does not
// depend on the order of the input. Limits with every rule and Count at
// zero delete every unprotected item older than MinAge: Validate refuses
// them for configurations.
package retention

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"
)

// Limits are the numbers of periods each rule keeps.
type Limits struct {
	Hourly, Daily, Weekly, Monthly, Yearly int
	// Count caps the unprotected items kept; 0 = no cap.
	Count int
	// MinAge keeps items younger than this regardless of the rules.
	MinAge time.Duration
}

// Validate refuses negative limits and limits that keep nothing.
func (l Limits) Validate() error {
	for _, f := range []struct {
		name string
		v    int
	}{{"hourly", l.Hourly}, {"daily", l.Daily}, {"weekly", l.Weekly}, {"monthly", l.Monthly}, {"yearly", l.Yearly}, {"count", l.Count}} {
		if f.v < 0 {
			return fmt.Errorf("retention limit %s = %d: must be 0 or more (e.g. hourly = 10)", f.name, f.v)
		}
	}
	if l.MinAge < 0 {
		return fmt.Errorf("retention min age %s: must be 0 or more (e.g. 30m)", l.MinAge)
	}
	if l.Hourly+l.Daily+l.Weekly+l.Monthly+l.Yearly == 0 {
		return errors.New("retention limits keep nothing: set at least one of hourly, daily, weekly, monthly, yearly (e.g. daily = 7)")
	}
	return nil
}

// Item is one snapshot or image of a timeline.
type Item struct {
	ID   string
	Time time.Time
	// Protected, when not empty, says why the item must not be deleted
	// ("exposed", "backup base", "in use by a set in progress").
	Protected string
}

// Rule names what kept an item.
type Rule string

const (
	Hourly    Rule = "hourly"
	Daily     Rule = "daily"
	Weekly    Rule = "weekly"
	Monthly   Rule = "monthly"
	Yearly    Rule = "yearly"
	MinAge    Rule = "min-age"
	Protected Rule = "protected"
)

// Decision is the plan for one item.
type Decision struct {
	Item Item
	Keep bool
	// Rules are the rules that keep the item, in the order hourly,
	// daily, weekly, monthly, yearly, min-age; or protected alone. Empty
	// when the item is deleted.
	Rules []Rule
	// Reason says why, in one line: which period each rule kept it for,
	// or why it goes.
	Reason string
}

type rule struct {
	name  Rule
	limit int
	key   func(time.Time) string
	label string // how a period is printed in a reason
}

func rules(l Limits) []rule {
	return []rule{
		{Hourly, l.Hourly, func(t time.Time) string { return t.Format("2006-01-02T15") }, "hour"},
		{Daily, l.Daily, func(t time.Time) string { return t.Format("2006-01-02") }, "day"},
		{Weekly, l.Weekly, func(t time.Time) string {
			y, m, d := t.Date()
			monday := time.Date(y, m, d-(int(t.Weekday())+6)%7, 0, 0, 0, 0, time.UTC)
			return "week of " + monday.Format("2006-01-02")
		}, "week"},
		{Monthly, l.Monthly, func(t time.Time) string { return t.Format("2006-01") }, "month"},
		{Yearly, l.Yearly, func(t time.Time) string { return t.Format("2006") }, "year"},
	}
}

// Plan decides, for every item, whether to keep it and why. The result
// is in the order of the items given.
func Plan(l Limits, items []Item, now time.Time) []Decision {
	loc := now.Location()
	out := make([]Decision, len(items))
	var order []int // unprotected items, youngest first
	for i, it := range items {
		out[i].Item = it
		if it.Protected != "" {
			out[i] = Decision{Item: it, Keep: true, Rules: []Rule{Protected}, Reason: "protected: " + it.Protected}
			continue
		}
		order = append(order, i)
	}
	sort.SliceStable(order, func(a, b int) bool {
		ta, tb := items[order[a]].Time, items[order[b]].Time
		if !ta.Equal(tb) {
			return ta.After(tb)
		}
		return items[order[a]].ID > items[order[b]].ID
	})
	why := make([][]string, len(items))
	for _, r := range rules(l) {
		if r.limit <= 0 {
			continue
		}
		kept := 0
		for k, i := range order {
			if kept >= r.limit {
				break
			}
			key := r.key(items[i].Time.In(loc))
			// First of its period: the next older item is in another one.
			if k+1 < len(order) && r.key(items[order[k+1]].Time.In(loc)) == key {
				continue
			}
			kept++
			out[i].Keep = true
			out[i].Rules = append(out[i].Rules, r.name)
			why[i] = append(why[i], fmt.Sprintf("first of %s %s (%s %d/%d)", r.label, key, r.name, kept, r.limit))
		}
	}
	youngest := now.Add(-l.MinAge)
	kept := 0
	for _, i := range order {
		young := l.MinAge > 0 && items[i].Time.After(youngest)
		if young {
			out[i].Keep = true
			out[i].Rules = append(out[i].Rules, MinAge)
			why[i] = append(why[i], fmt.Sprintf("younger than the minimum age %s", l.MinAge))
		}
		if !out[i].Keep {
			out[i].Reason = "no rule keeps it"
			continue
		}
		kept++
		if l.Count > 0 && kept > l.Count && !young {
			out[i].Keep = false
			out[i].Reason = fmt.Sprintf("over the count cap of %d (kept by %s)", l.Count, strings.Join(why[i], ", "))
			out[i].Rules = nil
			continue
		}
		out[i].Reason = "kept: " + strings.Join(why[i], ", ")
	}
	return out
}
