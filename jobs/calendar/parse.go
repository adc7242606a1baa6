package calendar

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

const (
	minYear    = 1970
	maxYear    = 2199
	usecPerSec = 1_000_000
	// maxComponents bounds a list such as 1,2,3,…: systemd refuses more
	// than 2048 items, and so does Parse.
	maxComponents = 2048
)

// component is one item of a list: start, start..stop or start[..stop]/repeat.
type component struct {
	start, stop, repeat int // stop < 0: no upper bound; repeat 0: start only
	text                string
}

// chain is the list of one field; nil matches every value.
type chain []component

// Spec is a parsed calendar event. It is immutable and safe for
// concurrent use.
type Spec struct {
	weekdays                       int // bit 0 Monday … bit 6 Sunday; 0 = every day
	year, month, day, hour, minute chain
	second                         chain // in microseconds
	endOfMonth                     bool  // day counts back from the end of the month (`~`)
	utc                            bool
	zone                           string // IANA name, "" for utc or the default zone
	loc                            *time.Location
}

// SyntaxError is what Parse returns for an expression it cannot accept.
type SyntaxError struct {
	Expr    string // the expression as given
	Token   string // the part that is wrong
	Problem string // what is wrong with it
	Example string // a correct expression of the kind that was meant
}

func (e *SyntaxError) Error() string {
	return fmt.Sprintf("calendar event %q: %s %q (example: %q; syntax: systemd.time(7), CALENDAR EVENTS)",
		e.Expr, e.Problem, e.Token, e.Example)
}

// Parse parses a calendar event expression. An expression without a
// time zone is in time.Local.
func Parse(expr string) (*Spec, error) {
	return ParseInLocation(expr, time.Local)
}

// ParseInLocation parses a calendar event expression; an expression
// without a time zone suffix is in loc.
func ParseInLocation(expr string, loc *time.Location) (*Spec, error) {
	if loc == nil {
		loc = time.Local
	}
	p := &parser{expr: expr}
	s, err := p.parse(loc)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// MustParse is Parse for expressions known to be good (tests, defaults);
// it panics on a bad one.
func MustParse(expr string) *Spec {
	s, err := Parse(expr)
	if err != nil {
		panic(err)
	}
	return s
}

type parser struct {
	expr string // whole expression, for errors
	s    string // the part being parsed (expression without its zone)
	i    int
}

func (p *parser) fail(token, problem, example string) error {
	return &SyntaxError{Expr: p.expr, Token: token, Problem: problem, Example: example}
}

// word returns the text from i to the next space, for errors.
func (p *parser) word(i int) string {
	if i >= len(p.s) {
		return p.s[len(p.s):]
	}
	rest := p.s[i:]
	if j := strings.IndexByte(rest, ' '); j >= 0 {
		return rest[:j]
	}
	return rest
}

func (p *parser) peek(k int) byte {
	if p.i+k < len(p.s) {
		return p.s[p.i+k]
	}
	return 0
}

func (p *parser) skipSpaces() {
	for p.i < len(p.s) && p.s[p.i] == ' ' {
		p.i++
	}
}

const (
	exWeekday = "Mon..Fri,Sun 07:00"
	exDate    = "*-*-01 03:00"
	exTime    = "Mon..Fri 07,12:00"
	exRepeat  = "*:0/15"
	exZone    = "daily Europe/Berlin"
)

var shorthands = map[string]string{
	"minutely":      "*-*-* *:*:00",
	"hourly":        "*-*-* *:00:00",
	"daily":         "*-*-* 00:00:00",
	"weekly":        "Mon *-*-* 00:00:00",
	"monthly":       "*-*-01 00:00:00",
	"quarterly":     "*-01,04,07,10-01 00:00:00",
	"semiannually":  "*-01,07-01 00:00:00",
	"semi-annually": "*-01,07-01 00:00:00",
	"biannually":    "*-01,07-01 00:00:00",
	"bi-annually":   "*-01,07-01 00:00:00",
	"yearly":        "*-01-01 00:00:00",
	"annually":      "*-01-01 00:00:00",
	"anually":       "*-01-01 00:00:00",
}

func (p *parser) parse(loc *time.Location) (*Spec, error) {
	spec := &Spec{loc: loc}
	body := p.expr
	if len(body) >= 4 && strings.EqualFold(body[len(body)-4:], " UTC") {
		spec.utc = true
		spec.loc = time.UTC
		body = body[:len(body)-4]
	} else if sp := strings.LastIndexByte(body, ' '); sp >= 0 {
		name := body[sp+1:]
		if z, ok := loadZone(name); ok {
			spec.zone = name
			spec.loc = z
			body = body[:sp]
		} else if looksLikeZone(name) {
			return nil, p.fail(name, "unknown time zone", exZone)
		}
	}
	if body == "" {
		return nil, p.fail(p.expr, "no schedule before the time zone in", exTime)
	}
	p.s = body
	if long, ok := shorthands[strings.ToLower(body)]; ok {
		p.s, p.i = long, 0
	}
	if strings.HasPrefix(p.s, "@") {
		if err := p.timestamp(spec); err != nil {
			return nil, err
		}
	} else {
		if err := p.weekdays(spec); err != nil {
			return nil, err
		}
		if err := p.date(spec); err != nil {
			return nil, err
		}
		if err := p.time(spec); err != nil {
			return nil, err
		}
	}
	spec.normalize()
	if err := spec.validate(p); err != nil {
		return nil, err
	}
	return spec, nil
}

// loadZone accepts what systemd's timezone_is_valid accepts: a zone
// name from the tz database (never Go's "Local" or the empty name).
func loadZone(name string) (*time.Location, bool) {
	if name == "" || name == "Local" || strings.ContainsAny(name, ":*,.~") || strings.HasPrefix(name, "/") {
		return nil, false
	}
	z, err := time.LoadLocation(name)
	if err != nil {
		return nil, false
	}
	return z, true
}

// looksLikeZone tells a misspelt zone (Europe/Berln, CET) from a
// misspelt schedule, so the error names the right part.
func looksLikeZone(w string) bool {
	if strings.Contains(w, "/") && !strings.ContainsAny(w, "0123456789*") {
		return true
	}
	if len(w) < 3 || len(w) > 5 {
		return false
	}
	for _, r := range w {
		if r < 'A' || r > 'Z' {
			return false
		}
	}
	return true
}

func (p *parser) timestamp(spec *Spec) error {
	n, err := strconv.ParseInt(p.s[1:], 10, 64)
	if err != nil || n < 0 || n > 7258118399 { // 2199-12-31 23:59:59 UTC
		return p.fail(p.s, "bad Unix timestamp", "@1767225600")
	}
	t := time.Unix(n, 0).UTC()
	one := func(v int) chain { return chain{{start: v, stop: -1}} }
	spec.year, spec.month, spec.day = one(t.Year()), one(int(t.Month())), one(t.Day())
	spec.hour, spec.minute, spec.second = one(t.Hour()), one(t.Minute()), one(t.Second()*usecPerSec)
	spec.utc, spec.zone, spec.loc = true, "", time.UTC
	return nil
}

var dayNames = []struct {
	name string
	nr   int
}{
	{"Monday", 0}, {"Mon", 0}, {"Tuesday", 1}, {"Tue", 1}, {"Wednesday", 2}, {"Wed", 2},
	{"Thursday", 3}, {"Thu", 3}, {"Friday", 4}, {"Fri", 4}, {"Saturday", 5}, {"Sat", 5},
	{"Sunday", 6}, {"Sun", 6},
}

// weekdays follows systemd's parse_weekdays: a leading list of names
// and ranges (`..`, or `-` as systemd still accepts), or nothing.
func (p *parser) weekdays(spec *Spec) error {
	from := -1
	first := true
	for {
		at := p.i
		nr := -1
		for _, d := range dayNames {
			if len(p.s)-p.i >= len(d.name) && strings.EqualFold(p.s[p.i:p.i+len(d.name)], d.name) {
				switch p.peek(len(d.name)) {
				case 0, '-', '.', ',', ' ':
				default:
					return p.fail(p.word(at), "unknown weekday", exWeekday)
				}
				nr = d.nr
				p.i += len(d.name)
				break
			}
		}
		if nr < 0 {
			if first {
				return nil
			}
			return p.fail(p.word(at), "unknown weekday", exWeekday)
		}
		spec.weekdays |= 1 << nr
		if from >= 0 {
			if from > nr {
				return p.fail(p.word(0), "weekday range runs backwards in", "Fri..Sun")
			}
			for j := from + 1; j < nr; j++ {
				spec.weekdays |= 1 << j
			}
		}
		switch p.peek(0) {
		case 0:
			return nil
		case ' ':
			p.skipSpaces()
			return nil
		case '.':
			if from >= 0 || p.peek(1) != '.' {
				return p.fail(p.word(0), "bad weekday range", exWeekday)
			}
			from = nr
			p.i += 2
		case '-':
			if from >= 0 {
				return p.fail(p.word(0), "bad weekday range", exWeekday)
			}
			from = nr
			p.i++
		case ',':
			from = -1
			p.i++
		}
		if c := p.peek(0); c == 0 || c == ' ' {
			p.skipSpaces()
			if from >= 0 {
				return p.fail(p.word(0), "weekday range has no end in", exWeekday)
			}
			return nil
		}
		first = false
	}
}

// dateSep takes the separator before a date's next part: '-', or '~'
// (the day then counts back from the end of the month). at is where the
// date began, for the error.
func (p *parser) dateSep(spec *Spec, at int) error {
	switch p.peek(0) {
	case '~':
		spec.endOfMonth = true
	case '-':
	default:
		return p.fail(p.word(at), "bad date", exDate)
	}
	p.i++
	return nil
}

// date follows systemd's parse_date: [[YEAR-]MONTH-]DAY or MONTH~DAY.
// Without one the date is *-*-*; a part ending in ':' is a time.
func (p *parser) date(spec *Spec) error {
	if p.i >= len(p.s) {
		return nil
	}
	at := p.i
	first, err := p.chain(fieldDate)
	if err != nil {
		return err
	}
	if c := p.peek(0); c == 0 || c == ':' {
		p.i = at // a time, not a date
		return nil
	}
	if err := p.dateSep(spec, at); err != nil {
		return err
	}
	second, err := p.chain(fieldDate)
	if err != nil {
		return err
	}
	if c := p.peek(0); c == 0 || c == ' ' {
		spec.month, spec.day = first, second
		p.skipSpaces()
		return nil
	} else if spec.endOfMonth {
		return p.fail(p.word(at), "`~` must come before the day in", "*-02~01")
	}
	if err := p.dateSep(spec, at); err != nil {
		return err
	}
	third, err := p.chain(fieldDate)
	if err != nil {
		return err
	}
	if c := p.peek(0); c != 0 && c != ' ' {
		return p.fail(p.word(at), "bad date", exDate)
	}
	spec.year, spec.month, spec.day = first, second, third
	p.skipSpaces()
	return nil
}

// time follows systemd's parse_calendar_time: HOUR:MINUTE[:SECOND], or
// 00:00:00 when there is none.
func (p *parser) time(spec *Spec) error {
	zero := chain{{start: 0, stop: -1}}
	if p.i >= len(p.s) {
		spec.hour, spec.minute, spec.second = zero, zero, zero
		return nil
	}
	at := p.i
	h, err := p.chain(fieldTime)
	if err != nil {
		return err
	}
	if p.peek(0) != ':' {
		return p.fail(p.word(at), "bad time", exTime)
	}
	p.i++
	m, err := p.chain(fieldTime)
	if err != nil {
		return err
	}
	spec.hour, spec.minute, spec.second = h, m, zero
	if p.i >= len(p.s) {
		return nil
	}
	if p.peek(0) != ':' {
		return p.fail(p.word(at), "bad time", exTime)
	}
	p.i++
	s, err := p.chain(fieldSecond)
	if err != nil {
		return err
	}
	if p.i < len(p.s) {
		return p.fail(p.word(at), "unexpected text after the time", exTime)
	}
	spec.second = s
	return nil
}

type field int

const (
	fieldDate field = iota
	fieldTime
	fieldSecond
)

func (f field) example() string {
	switch f {
	case fieldDate:
		return exDate
	case fieldSecond:
		return "*:*:0/10"
	}
	return exRepeat
}

// chain follows systemd's parse_chain and prepend_component.
func (p *parser) chain(f field) (chain, error) {
	usec := f == fieldSecond
	if p.peek(0) == '*' {
		p.i++
		if usec {
			return chain{{start: 0, stop: -1, repeat: usecPerSec, text: "*"}}, nil
		}
		return nil, nil
	}
	var ch chain
	for {
		if len(ch) >= maxComponents {
			return nil, p.fail(p.word(0), "more than 2048 list items in", f.example())
		}
		at := p.i
		start, err := p.decimal(f)
		if err != nil {
			return nil, err
		}
		stop, repeat := -1, 0
		if p.peek(0) == '.' && p.peek(1) == '.' {
			p.i += 2
			if stop, err = p.decimal(f); err != nil {
				return nil, err
			}
			repeat = 1
			if usec {
				repeat = usecPerSec
			}
		}
		if p.peek(0) == '/' {
			p.i++
			if repeat, err = p.decimal(f); err != nil {
				return nil, err
			}
			if repeat == 0 {
				return nil, p.fail(p.s[at:p.i], "repetition of 0 in", f.example())
			}
		} else if usec && stop >= 0 && start+repeat > stop {
			return nil, p.fail(p.s[at:p.i], "empty range of seconds", "*:*:10..20")
		}
		switch p.peek(0) {
		case 0, ' ', ',', '-', '~', ':':
		default:
			return nil, p.fail(p.word(at), "bad value", f.example())
		}
		ch = append(ch, component{start: start, stop: stop, repeat: repeat, text: p.s[at:p.i]})
		if p.peek(0) != ',' {
			return ch, nil
		}
		p.i++
	}
}

// decimal follows systemd's parse_component_decimal: digits, and for
// seconds an optional fraction (microseconds).
func (p *parser) decimal(f field) (int, error) {
	at := p.i
	for p.i < len(p.s) && p.s[p.i] >= '0' && p.s[p.i] <= '9' {
		p.i++
	}
	if p.i == at {
		if at < len(p.s) && (p.s[at] >= 'A' && p.s[at] <= 'Z' || p.s[at] >= 'a' && p.s[at] <= 'z') {
			return 0, p.fail(p.word(at), "unknown word (not a weekday Mon..Sun, a shorthand hourly|daily|weekly|monthly|…, a date or a time)", exWeekday)
		}
		return 0, p.fail(p.word(at), "expected a number or *, not", f.example())
	}
	v, err := strconv.ParseInt(p.s[at:p.i], 10, 32)
	if err != nil {
		return 0, p.fail(p.s[at:p.i], "number too large", f.example())
	}
	if f != fieldSecond {
		return int(v), nil
	}
	v *= usecPerSec
	if p.peek(0) == '.' && p.peek(1) != '.' {
		p.i++
		if p.i >= len(p.s) || p.s[p.i] < '0' || p.s[p.i] > '9' {
			return 0, p.fail(p.s[at:p.i], "fraction without digits in", "*:*:07.5")
		}
		frac, digits := 0, 0
		for p.i < len(p.s) && p.s[p.i] >= '0' && p.s[p.i] <= '9' {
			if digits < 6 {
				frac = frac*10 + int(p.s[p.i]-'0')
				digits++
			}
			p.i++
		}
		for ; digits < 6; digits++ {
			frac *= 10
		}
		v += int64(frac)
	}
	if v > 1<<31-1 {
		return 0, p.fail(p.s[at:p.i], "number too large", f.example())
	}
	return int(v), nil
}

// normalize follows systemd's calendar_spec_normalize.
func (s *Spec) normalize() {
	if s.weekdays == 0x7f {
		s.weekdays = 0
	}
	if s.endOfMonth && s.day == nil {
		s.endOfMonth = false
	}
	for i := range s.year {
		c := &s.year[i]
		for _, v := range []*int{&c.start, &c.stop} {
			switch {
			case *v >= 0 && *v < 70:
				*v += 2000
			case *v >= 70 && *v < 100:
				*v += 1900
			}
		}
	}
	for _, ch := range []*chain{&s.year, &s.month, &s.day, &s.hour, &s.minute, &s.second} {
		ch.normalize()
	}
}

func (ch *chain) normalize() {
	c := *ch
	for i := range c {
		x := &c[i]
		if x.stop > x.start && x.repeat > 0 {
			x.stop -= (x.stop - x.start) % x.repeat
		}
		if (x.stop > x.start && x.start+x.repeat > x.stop) || x.start == x.stop {
			x.repeat, x.stop = 0, -1
		}
	}
	if len(c) <= 1 {
		return
	}
	sortComponents(c)
	out := c[:1]
	for _, x := range c[1:] {
		last := out[len(out)-1]
		if x.start == last.start && x.stop == last.stop && x.repeat == last.repeat {
			continue
		}
		out = append(out, x)
	}
	*ch = out
}

func sortComponents(c chain) {
	less := func(a, b component) bool {
		if a.start != b.start {
			return a.start < b.start
		}
		if a.stop != b.stop {
			return a.stop < b.stop
		}
		return a.repeat < b.repeat
	}
	for i := 1; i < len(c); i++ { // lists are short; insertion sort keeps it dependency-free
		for j := i; j > 0 && less(c[j], c[j-1]); j-- {
			c[j], c[j-1] = c[j-1], c[j]
		}
	}
}

// validate follows systemd's calendar_spec_valid.
func (s *Spec) validate(p *parser) error {
	checks := []struct {
		ch       chain
		name     string
		from, to int
		eom      bool
		example  string
	}{
		{s.year, "year", minYear, maxYear, false, "2026..2030-*-* 00:00"},
		{s.month, "month", 1, 12, false, "*-01,07-01"},
		{s.day, "day", 1, 31, s.endOfMonth, exDate},
		{s.hour, "hour", 0, 23, false, exTime},
		{s.minute, "minute", 0, 59, false, exRepeat},
		{s.second, "second", 0, 60*usecPerSec - 1, false, "*:*:0/10"},
	}
	for _, c := range checks {
		to := c.to
		for _, x := range c.ch {
			if c.eom {
				// systemd takes 3 off the bound once per list item (its
				// check recurses with the bound it lowered), so the k-th
				// day from the end must be at most 31-3k: `~01,26` is
				// refused, `~01..26` or `~26` are not.
				to -= 3
			}
			bad := ""
			switch {
			case x.start < c.from || x.start > to:
				bad = "out of range"
			case x.repeat > to-c.from:
				bad = "repetition too large"
			case x.stop >= 0 && (x.stop < c.from || x.stop > to):
				bad = "range end out of range"
			case x.stop >= 0 && x.start+x.repeat > x.stop:
				bad = "empty range"
			case x.stop < 0 && c.eom && x.start-x.repeat < c.from:
				bad = "repetition never repeats"
			case x.stop < 0 && !c.eom && x.start+x.repeat > to:
				bad = "repetition never repeats"
			}
			if bad != "" {
				lo, hi := c.from, to
				if c.name == "second" {
					lo, hi = lo/usecPerSec, 59
				}
				return p.fail(x.text, fmt.Sprintf("%s %s (%d..%d) in", c.name, bad, lo, hi), c.example)
			}
		}
	}
	return nil
}

// Location is the time zone the expression is evaluated in.
func (s *Spec) Location() *time.Location { return s.loc }

// String is the normalized form, as `systemd-analyze calendar` prints it.
func (s *Spec) String() string {
	var b strings.Builder
	if s.weekdays != 0 {
		s.formatWeekdays(&b)
		b.WriteByte(' ')
	}
	s.year.format(&b, 4, false)
	b.WriteByte('-')
	s.month.format(&b, 2, false)
	if s.endOfMonth {
		b.WriteByte('~')
	} else {
		b.WriteByte('-')
	}
	s.day.format(&b, 2, false)
	b.WriteByte(' ')
	s.hour.format(&b, 2, false)
	b.WriteByte(':')
	s.minute.format(&b, 2, false)
	b.WriteByte(':')
	s.second.format(&b, 2, true)
	if s.utc {
		b.WriteString(" UTC")
	} else if s.zone != "" {
		b.WriteByte(' ')
		b.WriteString(s.zone)
	}
	return b.String()
}

var shortDays = [7]string{"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"}

func (s *Spec) formatWeekdays(b *strings.Builder) {
	comma := false
	l, x := -1, 0
	closeRun := func() {
		if x > l+1 {
			if x > l+2 {
				b.WriteString("..")
			} else {
				b.WriteString(",")
			}
			b.WriteString(shortDays[x-1])
		}
	}
	for ; x < 7; x++ {
		if s.weekdays&(1<<x) != 0 {
			if l < 0 {
				if comma {
					b.WriteByte(',')
				}
				comma = true
				b.WriteString(shortDays[x])
				l = x
			}
		} else if l >= 0 {
			closeRun()
			l = -1
		}
	}
	if l >= 0 {
		closeRun()
	}
}

func (ch chain) format(b *strings.Builder, width int, usec bool) {
	d := 1
	if usec {
		d = usecPerSec
	}
	if ch == nil || usec && len(ch) == 1 && ch[0].start == 0 && ch[0].repeat == usecPerSec && ch[0].stop < 0 {
		b.WriteByte('*')
		return
	}
	for i, c := range ch {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(b, "%0*d", width, c.start/d)
		if c.start%d > 0 {
			fmt.Fprintf(b, ".%06d", c.start%d)
		}
		if c.stop > 0 {
			fmt.Fprintf(b, "..%0*d", width, c.stop/d)
			if c.stop%d > 0 {
				fmt.Fprintf(b, ".%06d", c.stop%d)
			}
		}
		if c.repeat > 0 && !(c.stop > 0 && c.repeat == d) {
			fmt.Fprintf(b, "/%d", c.repeat/d)
			if c.repeat%d > 0 {
				fmt.Fprintf(b, ".%06d", c.repeat%d)
			}
		}
	}
}
