package retention

import (
	"fmt"
	"math/rand"
	"sort"
	"strings"
	"testing"
	"time"
)

// hourlyYear is a snapshot every hour for a year, the last at
// 2026-12-07 06:00 UTC.
func hourlyYear() ([]Item, time.Time) {
	end := time.Date(2026, 12, 7, 6, 0, 0, 0, time.UTC)
	start := end.AddDate(-1, 0, 0).Add(time.Hour) // 2025-12-07 07:00
	var items []Item
	for t := start; !t.After(end); t = t.Add(time.Hour) {
		items = append(items, Item{ID: t.Format("2006-01-02T15"), Time: t})
	}
	return items, end.Add(30 * time.Minute)
}

func keptIDs(ds []Decision) map[string]bool {
	m := map[string]bool{}
	for _, d := range ds {
		if d.Keep {
			m[d.Item.ID] = true
		}
	}
	return m
}

func ids(ts ...time.Time) map[string]bool {
	m := map[string]bool{}
	for _, t := range ts {
		m[t.Format("2006-01-02T15")] = true
	}
	return m
}

func union(ms ...map[string]bool) map[string]bool {
	out := map[string]bool{}
	for _, m := range ms {
		for k := range m {
			out[k] = true
		}
	}
	return out
}

func diff(t *testing.T, got, want map[string]bool) {
	t.Helper()
	var missing, extra []string
	for k := range want {
		if !got[k] {
			missing = append(missing, k)
		}
	}
	for k := range got {
		if !want[k] {
			extra = append(extra, k)
		}
	}
	sort.Strings(missing)
	sort.Strings(extra)
	if len(missing)+len(extra) > 0 {
		t.Fatalf("kept %d, want %d; missing %v; extra %v", len(got), len(want), missing, extra)
	}
}

func TestYearOfHourlySnapshots(t *testing.T) {
	items, now := hourlyYear()
	l := Limits{Hourly: 10, Daily: 10, Weekly: 0, Monthly: 10, Yearly: 10}
	ds := Plan(l, items, now)

	// The expectation, written out by hand from the rules.
	var hourly, daily, monthly []time.Time
	last := time.Date(2026, 12, 7, 6, 0, 0, 0, time.UTC)
	for i := 0; i < 10; i++ {
		hourly = append(hourly, last.Add(-time.Duration(i)*time.Hour)) // 06:00 back to Dec 6 21:00
		daily = append(daily, time.Date(2026, 12, 7-i, 0, 0, 0, 0, time.UTC))
		monthly = append(monthly, time.Date(2026, time.Month(12-i), 1, 0, 0, 0, 0, time.UTC)) // Mar..Dec
	}
	yearly := []time.Time{items[0].Time, time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	want := union(ids(hourly...), ids(daily...), ids(monthly...), ids(yearly...))
	// Overlaps: Dec 7 00:00 is hourly and daily; Dec 1 00:00 daily and monthly.
	if len(want) != 10+10+10+2-2 {
		t.Fatalf("expectation has %d items", len(want))
	}
	diff(t, keptIDs(ds), want)

	byID := map[string]Decision{}
	for _, d := range ds {
		byID[d.Item.ID] = d
	}
	if d := byID["2026-12-07T00"]; fmt.Sprint(d.Rules) != "[hourly daily]" || !strings.Contains(d.Reason, "first of day 2026-12-07 (daily 1/10)") {
		t.Errorf("Dec 7 00:00: %+v", d)
	}
	if d := byID["2026-03-01T00"]; fmt.Sprint(d.Rules) != "[monthly]" || !strings.Contains(d.Reason, "(monthly 10/10)") {
		t.Errorf("Mar 1 00:00: %+v", d)
	}
	if d := byID["2025-12-07T07"]; fmt.Sprint(d.Rules) != "[yearly]" {
		t.Errorf("first snapshot: %+v", d)
	}
	if d := byID["2026-06-15T12"]; d.Keep || d.Reason != "no rule keeps it" {
		t.Errorf("mid-year snapshot: %+v", d)
	}
	if len(ds) != len(items) {
		t.Fatalf("%d decisions for %d items", len(ds), len(items))
	}
}

func TestWeeklyRuleWeeksStartOnMonday(t *testing.T) {
	items, now := hourlyYear()
	ds := Plan(Limits{Weekly: 3}, items, now)
	// 2026-12-07 is a Monday: its week has begun; the two before began
	// on Nov 30 and Nov 23.
	want := ids(time.Date(2026, 12, 7, 0, 0, 0, 0, time.UTC), time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC),
		time.Date(2026, 11, 23, 0, 0, 0, 0, time.UTC))
	diff(t, keptIDs(ds), want)
}

func TestCountCapDeletesTheOldestKept(t *testing.T) {
	items, now := hourlyYear()
	ds := Plan(Limits{Hourly: 10, Daily: 10, Monthly: 10, Yearly: 10, Count: 20}, items, now)
	// 30 kept by the rules (see TestYearOfHourlySnapshots); the 20
	// youngest of them stay: 10 hours, 9 more days back to Nov 28 (Dec
	// 7 00:00 is one of the hours, Dec 1 also the month's), and the
	// first of November, kept by the monthly rule.
	var want []time.Time
	for i := 0; i < 10; i++ {
		want = append(want, time.Date(2026, 12, 7, 6-i, 0, 0, 0, time.UTC))
	}
	for d := 6; d >= 28-30; d-- { // Dec 6 back to Nov 28
		want = append(want, time.Date(2026, 12, d, 0, 0, 0, 0, time.UTC))
	}
	want = append(want, time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC))
	diff(t, keptIDs(ds), ids(want...))
	for _, d := range ds {
		if d.Item.ID == "2026-03-01T00" && (d.Keep || !strings.HasPrefix(d.Reason, "over the count cap of 20")) {
			t.Errorf("Mar 1: %+v", d)
		}
	}
}

func TestProtectedItemsAreNeverDeleted(t *testing.T) {
	items, now := hourlyYear()
	rng := rand.New(rand.NewSource(1))
	reasons := []string{"exposed", "backup base", "in use by a set in progress"}
	protected := map[string]string{}
	for i := range items {
		if rng.Intn(40) == 0 {
			items[i].Protected = reasons[rng.Intn(len(reasons))]
			protected[items[i].ID] = items[i].Protected
		}
	}
	for _, l := range []Limits{
		{Hourly: 10, Daily: 10, Monthly: 10, Yearly: 10},
		{Daily: 1, Count: 1},
		{Yearly: 1, Count: 1},
	} {
		ds := Plan(l, items, now)
		unprotectedKept := 0
		for _, d := range ds {
			if r, ok := protected[d.Item.ID]; ok {
				if !d.Keep || d.Reason != "protected: "+r || fmt.Sprint(d.Rules) != "[protected]" {
					t.Fatalf("%+v: protected item not kept as such", d)
				}
				continue
			}
			if d.Keep {
				unprotectedKept++
			}
		}
		if l.Count > 0 && unprotectedKept != l.Count {
			t.Fatalf("%+v: %d unprotected kept, want the count cap %d", l, unprotectedKept, l.Count)
		}
		// Protection takes no place in the rules: the plan for the
		// unprotected items is the plan without the protected ones.
		var rest []Item
		for _, it := range items {
			if it.Protected == "" {
				rest = append(rest, it)
			}
		}
		want := keptIDs(Plan(l, rest, now))
		got := keptIDs(ds)
		for id := range protected {
			delete(got, id)
		}
		diff(t, got, want)
	}
}

func TestMinAgeKeepsYoungItems(t *testing.T) {
	items, now := hourlyYear() // now is 06:30, the last item 06:00
	ds := Plan(Limits{Yearly: 1, Count: 1, MinAge: 3 * time.Hour}, items, now)
	want := ids(time.Date(2026, 12, 7, 6, 0, 0, 0, time.UTC), time.Date(2026, 12, 7, 5, 0, 0, 0, time.UTC),
		time.Date(2026, 12, 7, 4, 0, 0, 0, time.UTC))
	diff(t, keptIDs(ds), want) // the yearly one goes: three young items fill the cap of 1
}

func TestPlanIgnoresInputOrderAndTies(t *testing.T) {
	items, now := hourlyYear()
	// Two snapshots at the same instant: the one with the smaller ID is first.
	dup := items[100]
	dup.ID = dup.ID + "-b"
	items = append(items, dup)
	l := Limits{Hourly: 24 * 400}
	a := keptIDs(Plan(l, items, now))
	rand.New(rand.NewSource(2)).Shuffle(len(items), func(i, j int) { items[i], items[j] = items[j], items[i] })
	b := keptIDs(Plan(l, items, now))
	diff(t, a, b)
	if len(a) != len(items)-1 {
		t.Fatalf("kept %d of %d", len(a), len(items))
	}
	if a[dup.ID] || !a[strings.TrimSuffix(dup.ID, "-b")] {
		t.Fatalf("tie: kept %v %v", a[dup.ID], a[strings.TrimSuffix(dup.ID, "-b")])
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		l    Limits
		want string
	}{
		{Limits{}, "keep nothing"},
		{Limits{Count: 5}, "keep nothing"},
		{Limits{Daily: -1}, "daily = -1"},
		{Limits{Daily: 1, MinAge: -time.Second}, "min age"},
		{Limits{Daily: 7}, ""},
	} {
		err := tc.l.Validate()
		if (err == nil) != (tc.want == "") || err != nil && !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.l, err, tc.want)
		}
	}
}
