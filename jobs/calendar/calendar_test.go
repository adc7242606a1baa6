package calendar

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func mustTime(t testing.TB, s string) time.Time {
	t.Helper()
	v, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestNormalizedForm(t *testing.T) {
	for _, tc := range []struct{ expr, want string }{
		{"minutely", "*-*-* *:*:00"},
		{"hourly", "*-*-* *:00:00"},
		{"DAILY", "*-*-* 00:00:00"},
		{"weekly", "Mon *-*-* 00:00:00"},
		{"monthly", "*-*-01 00:00:00"},
		{"quarterly", "*-01,04,07,10-01 00:00:00"},
		{"semiannually", "*-01,07-01 00:00:00"},
		{"yearly", "*-01-01 00:00:00"},
		{"daily UTC", "*-*-* 00:00:00 UTC"},
		{"weekly Europe/Berlin", "Mon *-*-* 00:00:00 Europe/Berlin"},
		{"Mon..Fri 07,12:00", "Mon..Fri *-*-* 07,12:00:00"},
		{"Mon-Fri 10:00", "Mon..Fri *-*-* 10:00:00"},
		{"Sat,Mon..Wed,Fri 1,2,3:7", "Mon..Wed,Fri,Sat *-*-* 01,02,03:07:00"},
		{"mon,wed,FRIDAY *-*-1..10/3 1:2:3", "Mon,Wed,Fri *-*-01..10/3 01:02:03"},
		{"Mon..Sun 12:00", "*-*-* 12:00:00"},
		{"Mon,Tue", "Mon,Tue *-*-* 00:00:00"},
		{"*:0/15", "*-*-* *:00/15:00"},
		{"*:5,0..30/10", "*-*-* *:00..30/10,05:00"},
		{"*:0..59/1", "*-*-* *:00..59:00"},
		{"5..5:00", "*-*-* 05:00:00"},
		{"*-*~1..3", "*-*~01..03 00:00:00"},
		{"*-*-01", "*-*-01 00:00:00"},
		{"2026-12-24", "2026-12-24 00:00:00"},
		{"26-01-01", "2026-01-01 00:00:00"},
		{"*-1,1,01-*", "*-01-* 00:00:00"},
		{"00:00:30.5", "*-*-* 00:00:30.500000"},
		{"@1700000000", "2023-11-14 22:13:20 UTC"},
	} {
		s, err := ParseInLocation(tc.expr, time.UTC)
		if err != nil {
			t.Errorf("%q: %v", tc.expr, err)
			continue
		}
		if got := s.String(); got != tc.want {
			t.Errorf("%q: String() = %q, want %q", tc.expr, got, tc.want)
		}
	}
}

func TestNext(t *testing.T) {
	berlin, err := time.LoadLocation("Europe/Berlin")
	if err != nil {
		t.Skipf("no tz database: %v", err)
	}
	for _, tc := range []struct {
		expr, after string
		want        []string // UTC
	}{
		{"*:0/15", "2026-12-07T06:02:28Z", []string{"2026-12-07T06:15:00Z", "2026-12-07T06:30:00Z"}},
		{"hourly", "2026-12-07T06:00:00Z", []string{"2026-12-07T07:00:00Z"}}, // strictly after
		{"Mon..Fri 07,12:00", "2026-12-11T12:00:00Z", []string{"2026-12-14T07:00:00Z"}},
		{"*-*~01 23:00", "2027-02-01T00:00:00Z", []string{"2027-02-28T23:00:00Z", "2027-03-31T23:00:00Z"}},
		{"*-02-29", "2026-01-01T00:00:00Z", []string{"2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"}},
		{"*-02-30", "2026-01-01T00:00:00Z", []string{"0001-01-01T00:00:00Z"}}, // never
		// Spring forward in Berlin: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that day.
		{"*-*-* 02:30 Europe/Berlin", "2026-03-28T00:50:00Z", []string{"2026-03-28T01:30:00Z", "2026-03-30T00:30:00Z"}},
		{"*:0/30 Europe/Berlin", "2026-03-29T00:30:00Z", []string{"2026-03-29T01:00:00Z"}},
		// Fall back: 02:30 happens twice; it elapses once, at the first
		// occurrence after the base.
		{"*-*-* 02:30 Europe/Berlin", "2026-10-25T00:00:00Z", []string{"2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"}},
		{"*-*-* 02:30 Europe/Berlin", "2026-10-25T01:10:00Z", []string{"2026-10-25T01:30:00Z"}},
	} {
		s, err := ParseInLocation(tc.expr, time.UTC)
		if err != nil {
			t.Fatalf("%q: %v", tc.expr, err)
		}
		if strings.HasSuffix(tc.expr, "Berlin") && s.Location().String() != berlin.String() {
			t.Fatalf("%q: location %v", tc.expr, s.Location())
		}
		at := mustTime(t, tc.after)
		for i, w := range tc.want {
			want := mustTime(t, w)
			got := s.Next(at)
			if want.Year() == 1 {
				if !got.IsZero() {
					t.Errorf("%q after %s: got %s, want never", tc.expr, at, got)
				}
				break
			}
			if !got.Equal(want) {
				t.Errorf("%q after %s: elapse %d = %s, want %s", tc.expr, at, i+1, got.UTC(), want)
				break
			}
			at = got
		}
	}
}

// TestNextRepeatOverTwoFields holds where Next differs from systemd
// 252 (doc.go): a repetition that runs past its field's end with a
// carry over two fields does not skip the list's earlier items.
func TestNextRepeatOverTwoFields(t *testing.T) {
	for _, tc := range []struct{ expr, after, want, systemd string }{
		{"*-*-1/7", "2026-12-30T12:00:00Z", "2027-01-01T00:00:00Z", "2027-01-08"},
		{"*:*:11,29/25", "2026-12-07T22:59:54Z", "2026-12-07T23:00:11Z", "23:00:29"},
		{"*:0/25,10", "2026-12-07T23:50:30Z", "2026-12-08T00:00:00Z", "00:25:00"},
		// One field: both agree.
		{"*:*:11,29/25", "2026-12-07T22:58:54Z", "2026-12-07T22:59:11Z", "22:59:11"},
	} {
		s, err := ParseInLocation(tc.expr, time.UTC)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := s.Next(mustTime(t, tc.after)), mustTime(t, tc.want); !got.Equal(want) {
			t.Errorf("%q after %s: Next = %s, want %s (systemd 252: %s)", tc.expr, tc.after, got, want, tc.systemd)
		}
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct{ expr, token string }{
		{"Fry 10:00", "Fry"},
		{"Mond 10:00", "Mond"},
		{"Fri..Mon", "Fri..Mon"},
		{"*:0/60", "0/60"},
		{"*-*-* 24:00", "24"},
		{"*-13-01", "13"},
		{"daily Europe/Berln", "Europe/Berln"},
		{"*:0/0", "0/0"},
		{"12", "12"},
		{"*-*-* 1:2:3.", "3."},
		{"1969-01-01", "1969"},
		{"", ""},
	} {
		_, err := ParseInLocation(tc.expr, time.UTC)
		var se *SyntaxError
		if !errors.As(err, &se) {
			t.Errorf("%q: error %v, want a *SyntaxError", tc.expr, err)
			continue
		}
		if se.Token != tc.token || se.Example == "" || !strings.Contains(err.Error(), fmt.Sprintf("%q", tc.expr)) {
			t.Errorf("%q: %v (token %q), want token %q, the expression and an example", tc.expr, err, se.Token, tc.token)
		}
		if _, err := ParseInLocation(se.Example, time.UTC); err != nil {
			t.Errorf("%q: the example %q in its error does not parse: %v", tc.expr, se.Example, err)
		}
	}
}

// systemdCases are checked against the real systemd-analyze: every
// valid one for its normalized form and elapses, every invalid one for
// being refused by both.
var systemdValid = []string{
	"minutely", "hourly", "daily", "weekly", "monthly", "quarterly", "semiannually", "yearly", "annually",
	"Mon..Fri 07,12:00", "*:0/15", "*:0/15 Europe/Berlin", "hourly Europe/Berlin", "daily Europe/Berlin",
	"*-*-* 02:30 Europe/Berlin", "*-*-* 02,03:30 Europe/Berlin", "*-*-* 01..04:30 Europe/Berlin",
	"*:*:0/20 Europe/Berlin", "*-*-* 02:*:00 Europe/Berlin", "Sun *-*-* 01..03:00/20 Europe/Berlin",
	"*-*~01", "*-*~1..3", "*-*~07/1", "Mon *-05~07/1", "*-02~03", "*-02-29", "Fri *-02-29",
	"*-*-31", "*-02-30", "2026..2030/2-*-*", "26-01-01", "@1700000000", "@1900000000",
	"Sat,Mon..Wed,Fri 1,2,3:7", "mon,wed,FRIDAY *-*-1..10/3 1:2:3", "*:5,0..30/10", "*:0..59/1",
	"5..5:00", "*:*:1..9/2", "00:00:30.5", "Mon-Fri 10:00", "Mon,", "*-1,1,01-*", "*-*-3/10 12:00", "*-*",
	"*-1..12/5-1/10 6:6:6", "12:00 America/New_York", "Sat *-*-1..7 18:00", "*:*:*",
	"Tue..Thu *-11..12-* 9..17:00/30", "daily Asia/Kolkata", "yearly UTC", "daily utc",
	"*-*-* 23:59:59 Europe/Berlin", "Mon..Fri *-*-* 8..18:0/20 Europe/Berlin", "*-*-* 0/3:00",
	"2027-*-* 00:00", "2026-03-29 02:30 Europe/Berlin", "2026-10-25 02:15 Europe/Berlin", "*-*-* 12:00 CET",
	"*-*~26", "*-*~1..28", "*-*~01,2,20", "*-*~1,2,3,4,5,6,7",
}

var systemdInvalid = []string{
	"*:*/15", "*:0/60", "*:30/30", "Fri..Mon", "*-*~03..01", "*-*-* 24:00", "*:*:5..5", "today",
	"12:00 Europe/Nowhere", " daily", "daily ", "*-*-* 1:2:3.", "Fry 10:00", "*-13-01", "*-*-32",
	"1969-01-01", "2200-01-01", "Mon..", "Mon..Fri..Sun", "12", "12:", ":00", "hourly daily",
	"*-*-* 12:00:00:00", "*:0/0", "*-*-~1", "Mond", "*-*-* 12:00 cet",
	"*-*~1,26", "*-*~12,27", "*-*~1,2,3,4,5,6,7,8", "Sat,Wed *~24/1,26/1",
}

var systemdBases = []string{
	"2026-03-29T00:58:30Z", // 01:58:30 in Berlin, before clocks go forward
	"2026-10-25T00:58:30Z", // 02:58:30 CEST, before clocks go back
	"2026-10-25T01:10:00Z", // 02:10 CET, in the repeated hour
	"2028-02-28T23:59:30Z", // before a leap day
}

// analyze runs systemd-analyze calendar in UTC and returns the
// normalized form and the elapses, or ok=false if it refused expr.
func analyze(t *testing.T, bin, expr string, base time.Time, n int) (string, []time.Time, bool) {
	cmd := exec.Command(bin, "calendar", fmt.Sprintf("--iterations=%d", n),
		fmt.Sprintf("--base-time=@%d", base.Unix()), expr)
	cmd.Env = append(os.Environ(), "TZ=UTC", "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=")
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return "", nil, false
		}
		t.Fatalf("%s: %v", bin, err)
	}
	var norm string
	var times []time.Time
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), ": ")
		if !ok {
			continue
		}
		switch {
		case k == "Normalized form":
			norm = v
		case k == "Next elapse" || strings.HasPrefix(k, "Iter. #"):
			if v == "never" {
				return norm, times, true
			}
			at, err := time.Parse("Mon 2006-01-02 15:04:05 MST", v)
			if err != nil {
				t.Fatalf("systemd-analyze printed %q: %v", v, err)
			}
			times = append(times, at)
		}
	}
	return norm, times, true
}

func TestAgainstSystemdAnalyze(t *testing.T) {
	bin, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed: the comparison with systemd's own calendar needs it")
	}
	const iterations = 10
	var mu sync.Mutex
	var failures []string
	fail := func(format string, a ...any) {
		mu.Lock()
		defer mu.Unlock()
		failures = append(failures, fmt.Sprintf(format, a...))
	}
	jobs := make(chan func())
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				j()
			}
		}()
	}
	for _, expr := range systemdValid {
		bases := []string{systemdBases[1], systemdBases[3]}
		if strings.Contains(expr, "Europe/Berlin") {
			bases = systemdBases[:3]
		}
		for _, b := range bases {
			base := mustTime(t, b)
			jobs <- func() {
				norm, want, ok := analyze(t, bin, expr, base, iterations)
				if !ok {
					fail("%q: systemd-analyze refuses it", expr)
					return
				}
				s, err := ParseInLocation(expr, time.UTC)
				if err != nil {
					fail("%q: %v", expr, err)
					return
				}
				if s.String() != norm {
					fail("%q: normalized %q, systemd %q", expr, s.String(), norm)
				}
				at := base
				for i := 0; i <= len(want); i++ {
					got := s.Next(at)
					if i == len(want) {
						if len(want) < iterations && !got.IsZero() {
							fail("%q from %s: elapse %d at %s, systemd: never", expr, base, i+1, got.UTC())
						}
						break
					}
					// systemd prints whole seconds.
					if !got.Truncate(time.Second).Equal(want[i]) {
						fail("%q from %s: elapse %d at %s, systemd %s", expr, base, i+1, got.UTC(), want[i])
						break
					}
					at = got
				}
			}
		}
	}
	for _, expr := range systemdInvalid {
		jobs <- func() {
			if _, _, ok := analyze(t, bin, expr, mustTime(t, systemdBases[0]), 1); ok {
				fail("%q: systemd-analyze accepts it; the test's list is wrong", expr)
			}
			if s, err := ParseInLocation(expr, time.UTC); err == nil {
				fail("%q: accepted as %q, systemd refuses it", expr, s)
			}
		}
	}
	close(jobs)
	wg.Wait()
	for _, f := range failures {
		t.Error(f)
	}
}

// checkSpec is the property the fuzz test holds every parsed
// expression to: the normal form parses to itself, and elapses rise
// strictly and each one matches the expression.
func checkSpec(t *testing.T, expr string, s *Spec, base time.Time) {
	t.Helper()
	again, err := ParseInLocation(s.String(), s.Location())
	if err != nil {
		t.Fatalf("%q: normalized form %q does not parse: %v", expr, s.String(), err)
	}
	if again.String() != s.String() {
		t.Fatalf("%q: normalized %q, reparsed %q", expr, s.String(), again.String())
	}
	at := base
	for i := 0; i < 6; i++ {
		n := s.Next(at)
		if n.IsZero() {
			return
		}
		if !n.After(at) {
			t.Fatalf("%q: Next(%s) = %s, not after it", expr, at, n)
		}
		if !s.Matches(n) {
			t.Fatalf("%q: Next(%s) = %s, which the expression does not name", expr, at, n)
		}
		if m := again.Next(at); !m.Equal(n) {
			t.Fatalf("%q: Next(%s) = %s, of the normal form %s", expr, at, n, m)
		}
		at = n
	}
}

func FuzzParse(f *testing.F) {
	for _, e := range systemdValid {
		f.Add(e)
	}
	for _, e := range systemdInvalid {
		f.Add(e)
	}
	base := mustTime(f, "2026-10-25T00:40:00Z")
	berlin, err := time.LoadLocation("Europe/Berlin")
	if err != nil {
		f.Skipf("no tz database: %v", err)
	}
	f.Fuzz(func(t *testing.T, expr string) {
		if len(expr) > 200 {
			return
		}
		loc := time.UTC
		if len(expr)%2 == 1 {
			loc = berlin // zone transitions for half the inputs
		}
		s, err := ParseInLocation(expr, loc)
		if err != nil {
			var se *SyntaxError
			if !errors.As(err, &se) {
				t.Fatalf("%q: error %T %v, want a *SyntaxError", expr, err, err)
			}
			return
		}
		checkSpec(t, expr, s, base)
	})
}

func TestMatchesAgreesWithNext(t *testing.T) {
	// Walk every minute of a day with a DST change and check that Next
	// steps exactly over the minutes Matches accepts.
	for _, expr := range []string{"*:0/15 Europe/Berlin", "Sun *-*-* 01..03:00/20 Europe/Berlin", "*-*-* 02:*:00 Europe/Berlin"} {
		s, err := Parse(expr)
		if err != nil {
			t.Fatal(err)
		}
		start := mustTime(t, "2026-03-28T22:00:00Z")
		next := s.Next(start.Add(-time.Second))
		for m := start; m.Before(start.Add(6 * time.Hour)); m = m.Add(time.Minute) {
			if s.Matches(m) != m.Equal(next) {
				t.Fatalf("%q at %s: Matches %v, next elapse %s", expr, m.UTC(), s.Matches(m), next.UTC())
			}
			if m.Equal(next) {
				next = s.Next(m)
			}
		}
	}
}

// randomExpr builds an expression from the syntax's parts, valid or
// not: lists, ranges and repetitions with values around each field's
// bounds, `~`, weekdays and zones.
func randomExpr(r *rand.Rand) string {
	pick := func(xs ...string) string { return xs[r.IntN(len(xs))] }
	comp := func(max int) string {
		if r.IntN(3) == 0 {
			return "*"
		}
		var parts []string
		for range 1 + r.IntN(3) {
			v := r.IntN(max + 3)
			s := fmt.Sprint(v)
			if r.IntN(3) == 0 {
				s = fmt.Sprintf("%02d", v)
			}
			switch r.IntN(5) {
			case 0:
				s += ".." + fmt.Sprint(v+r.IntN(max/2+2))
			case 1:
				s += "/" + fmt.Sprint(r.IntN(max/2+2))
			case 2:
				s += ".." + fmt.Sprint(v+r.IntN(max/2+2)) + "/" + fmt.Sprint(1+r.IntN(5))
			}
			parts = append(parts, s)
		}
		return strings.Join(parts, ",")
	}
	var b []string
	if r.IntN(3) == 0 {
		days := []string{"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun", "monday", "FRI"}
		w := pick(days...)
		if r.IntN(2) == 0 {
			w += pick("..", "-", ",") + pick(days...)
		}
		b = append(b, w)
	}
	if r.IntN(2) == 0 {
		d := comp(12) + pick("-", "~") + comp(31)
		if r.IntN(2) == 0 {
			d = pick("*", "2027", "2026..2030", "27", "2027/2") + "-" + d
		}
		b = append(b, d)
	}
	if r.IntN(5) != 0 {
		t := comp(23) + ":" + comp(59)
		if r.IntN(2) == 0 {
			t += ":" + comp(59)
		}
		b = append(b, t)
	}
	if r.IntN(4) == 0 {
		b = append(b, pick("UTC", "Europe/Berlin", "America/New_York"))
	}
	if len(b) == 0 {
		return pick("hourly", "daily", "weekly")
	}
	return strings.Join(b, " ")
}

// TestRandomAgainstSystemdAnalyze gives systemd-analyze and Parse the
// same random expressions (one process for all) and compares what each
// accepts, the normalized forms and three elapses.
func TestRandomAgainstSystemdAnalyze(t *testing.T) {
	bin, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed: the comparison with systemd's own calendar needs it")
	}
	// Fixed seeds keep the test deterministic; CALENDAR_SEED=N explores
	// others (some meet the differences doc.go lists).
	seeds := []uint64{1, 2, 3}
	if s := os.Getenv("CALENDAR_SEED"); s != "" {
		var seed uint64
		fmt.Sscan(s, &seed)
		seeds = []uint64{seed}
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) { randomAgainstSystemd(t, bin, seed) })
	}
}

func randomAgainstSystemd(t *testing.T, bin string, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 1))
	base := mustTime(t, systemdBases[r.IntN(len(systemdBases))])
	var exprs []string
	seen := map[string]bool{}
	for len(exprs) < 400 {
		if e := randomExpr(r); !seen[e] {
			seen[e] = true
			exprs = append(exprs, e)
		}
	}
	cmd := exec.Command(bin, append([]string{"calendar", "--iterations=3", fmt.Sprintf("--base-time=@%d", base.Unix())}, exprs...)...)
	cmd.Env = append(os.Environ(), "TZ=UTC", "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=")
	out, _ := cmd.Output() // exits 1 when any expression is refused
	// Each accepted expression prints "Original form" (left out when it
	// equals the normalized form), "Normalized form" and its elapses.
	sys := map[string][]string{}
	var cur string
	original := false
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), ": ")
		if !ok {
			continue
		}
		switch {
		case k == "Original form":
			cur = v
		case k == "Normalized form":
			if !original {
				cur = v
			}
			sys[cur] = []string{v}
		case k == "Next elapse" || strings.HasPrefix(k, "Iter. #"):
			sys[cur] = append(sys[cur], v)
		}
		original = k == "Original form"
	}
	if len(sys) == 0 {
		t.Fatalf("systemd-analyze accepted none of %d expressions", len(exprs))
	}
	for _, e := range exprs {
		want, accepted := sys[e]
		s, err := ParseInLocation(e, time.UTC)
		if (err == nil) != accepted {
			t.Errorf("%q: Parse error %v, systemd accepts it: %v", e, err, accepted)
			continue
		}
		if !accepted {
			continue
		}
		got := []string{s.String()}
		at := base
		for i := 0; i < 3; i++ {
			if at = s.Next(at); at.IsZero() {
				if i == 0 {
					got = append(got, "never")
				}
				break
			}
			got = append(got, at.UTC().Format("Mon 2006-01-02 15:04:05 UTC"))
		}
		if !slices.Equal(got, want) {
			t.Errorf("%q from %s:\n  Parse:   %q\n  systemd: %q", e, base, got, want)
		}
	}
}
