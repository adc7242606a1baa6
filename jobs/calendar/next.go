package calendar

import (
	"sort"
	"time"
)

// civil is a wall-clock time without a zone; us is the second of the
// minute in microseconds.
type civil struct {
	y, mo, d, h, mi, us int
}

func civilOf(t time.Time) civil {
	y, mo, d := t.Date()
	return civil{y, int(mo), d, t.Hour(), t.Minute(), t.Second()*usecPerSec + t.Nanosecond()/1000}
}

// utc is the wall time read as UTC, which also normalizes overflowing
// fields (day 32 is the first of the next month).
func (c civil) utc() time.Time {
	return time.Date(c.y, time.Month(c.mo), c.d, c.h, c.mi, c.us/usecPerSec, c.us%usecPerSec*1000, time.UTC)
}

func (c civil) norm() civil { return civilOf(c.utc()) }

// outOfBounds follows systemd's tm_out_of_bounds: a field overflowed
// (31 February) or the year is past the last one systemd computes.
func (c civil) outOfBounds() bool {
	return c.y > maxYear || c.norm() != c
}

// Next returns the first elapse strictly after after, in the spec's
// location, or the zero time if the expression never elapses again
// (before the year 2200, as systemd).
func (s *Spec) Next(after time.Time) time.Time {
	start := after.Truncate(time.Microsecond).Add(time.Microsecond)
	c := civilOf(start.In(s.loc))
	for {
		w, ok := s.nextWall(c)
		if !ok {
			return time.Time{}
		}
		for _, t := range resolve(w, s.loc) {
			if t.After(after) {
				return t
			}
		}
		c = w
		c.us++
		if gapEnd, ok := skipGap(w, s.loc); ok {
			// w does not exist: clocks went forward over it. Resume
			// at the first wall time after the jump, not microsecond
			// by microsecond through the hour that never happens.
			c = gapEnd
		}
	}
}

// resolve returns the instants, ascending, at which the wall clock of
// loc shows w: none in a gap, two in a repeated hour, else one.
func resolve(w civil, loc *time.Location) []time.Time {
	u := w.utc()
	if loc == time.UTC {
		return []time.Time{u}
	}
	var out []time.Time
	seen := map[int]bool{}
	for _, probe := range []time.Time{u.Add(-48 * time.Hour), u, u.Add(48 * time.Hour)} {
		_, off := probe.In(loc).Zone()
		if seen[off] {
			continue
		}
		seen[off] = true
		t := u.Add(-time.Duration(off) * time.Second).In(loc)
		if civilOf(t) == w {
			out = append(out, t)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Before(out[j]) })
	return out
}

// skipGap returns the first wall time after the gap w falls in, if w
// does not exist in loc.
func skipGap(w civil, loc *time.Location) (civil, bool) {
	if loc == time.UTC || len(resolve(w, loc)) > 0 {
		return civil{}, false
	}
	u := w.utc()
	_, before := u.Add(-48 * time.Hour).In(loc).Zone()
	// Read with the offset in force before the jump, w is an instant
	// after it; the zone period of that instant starts at the jump.
	start, _ := u.Add(-time.Duration(before) * time.Second).In(loc).ZoneBounds()
	if start.IsZero() {
		return civil{}, false
	}
	end := civilOf(start.In(loc))
	if !end.utc().After(w.utc()) {
		return civil{}, false
	}
	return end, true
}

// nextWall follows systemd's find_next on wall-clock fields: the first
// wall time at or after c that the spec matches.
func (s *Spec) nextWall(c civil) (civil, bool) {
	for {
		c = c.norm()
		if c.y > maxYear {
			return civil{}, false
		}
		v, r := s.year.next(c.y)
		if r < 0 {
			return civil{}, false
		}
		if r > 0 {
			c = civil{y: v, mo: 1, d: 1}
		}
		if c.outOfBounds() {
			return civil{}, false
		}

		v, r = s.month.next(c.mo)
		if r > 0 {
			c = civil{y: c.y, mo: v, d: 1}
		}
		if r < 0 || c.outOfBounds() {
			c = civil{y: c.y + 1, mo: 1, d: 1}
			continue
		}

		v, r = s.nextDay(c)
		if r > 0 {
			c = civil{y: c.y, mo: c.mo, d: v}
		}
		if r < 0 || c.outOfBounds() {
			c = civil{y: c.y, mo: c.mo + 1, d: 1}
			continue
		}

		if !s.weekdayMatches(c) {
			c = civil{y: c.y, mo: c.mo, d: c.d + 1}
			continue
		}

		v, r = s.hour.next(c.h)
		if r > 0 {
			c.h, c.mi, c.us = v, 0, 0
		}
		if r < 0 || c.outOfBounds() {
			c = civil{y: c.y, mo: c.mo, d: c.d + 1}
			continue
		}

		v, r = s.minute.next(c.mi)
		if r > 0 {
			c.mi, c.us = v, 0
		}
		if r < 0 || c.outOfBounds() {
			c.h, c.mi, c.us = c.h+1, 0, 0
			continue
		}

		v, r = s.second.next(c.us)
		if r > 0 {
			c.us = v
		}
		if r < 0 || c.outOfBounds() {
			c.mi, c.us = c.mi+1, 0
			continue
		}
		return c, true
	}
}

// next follows systemd's find_matching_component: the smallest value
// >= val the chain matches; r is 0 if that is val, 1 if larger, -1 if
// there is none.
func (ch chain) next(val int) (int, int) {
	return ch.nextWith(val, func(c component) (int, int) { return c.start, c.stop })
}

func (ch chain) nextWith(val int, bounds func(component) (int, int)) (int, int) {
	if ch == nil {
		return val, 0
	}
	d, set := 0, false
	for _, c := range ch {
		start, stop := bounds(c)
		if start >= val {
			if !set || start < d {
				d, set = start, true
			}
		} else if c.repeat > 0 {
			k := start + c.repeat*((val-start+c.repeat-1)/c.repeat)
			if (!set || k < d) && (stop < 0 || k <= stop) {
				d, set = k, true
			}
		}
	}
	if !set {
		return val, -1
	}
	if d != val {
		return d, 1
	}
	return d, 0
}

func (s *Spec) nextDay(c civil) (int, int) {
	if !s.endOfMonth {
		return s.day.next(c.d)
	}
	return s.day.nextWith(c.d, func(x component) (int, int) {
		start, stop := endOfMonth(c, x.start), endOfMonth(c, x.stop)
		if stop > 0 {
			start, stop = stop, start
		}
		return start, stop
	})
}

// endOfMonth follows systemd's find_end_of_month: the day that is
// `day` days before the end of c's month counting the last as 1, or -1.
func endOfMonth(c civil, day int) int {
	t := time.Date(c.y, time.Month(c.mo+1), 1-day, 0, 0, 0, 0, time.UTC)
	if int(t.Month()) != (c.mo-1)%12+1 {
		return -1
	}
	return t.Day()
}

func (s *Spec) weekdayMatches(c civil) bool {
	if s.weekdays == 0 {
		return true
	}
	wd := (int(c.utc().Weekday()) + 6) % 7 // Monday = 0
	return s.weekdays&(1<<wd) != 0
}

// Matches reports whether t (read on the spec's wall clock) is an
// instant the expression names, ignoring which of two repeated wall
// times Next picks. Tests use it to check Next without Next.
func (s *Spec) Matches(t time.Time) bool {
	c := civilOf(t.In(s.loc))
	if !s.weekdayMatches(c) {
		return false
	}
	day := s.day.contains(c.d, nil)
	if s.endOfMonth {
		day = s.day.contains(c.d, func(x component) (int, int) {
			start, stop := endOfMonth(c, x.start), endOfMonth(c, x.stop)
			if stop > 0 {
				start, stop = stop, start
			}
			return start, stop
		})
	}
	return day && s.year.contains(c.y, nil) && s.month.contains(c.mo, nil) &&
		s.hour.contains(c.h, nil) && s.minute.contains(c.mi, nil) && s.second.contains(c.us, nil)
}

func (ch chain) contains(v int, bounds func(component) (int, int)) bool {
	if ch == nil {
		return true
	}
	for _, c := range ch {
		start, stop := c.start, c.stop
		if bounds != nil {
			start, stop = bounds(c)
		}
		if start < 0 {
			continue
		}
		switch {
		case v == start:
			return true
		case v < start || c.repeat == 0:
		case (v-start)%c.repeat == 0 && (stop < 0 || v <= stop):
			return true
		}
	}
	return false
}
