// Package calendar parses systemd calendar events (systemd.time(7),
// "CALENDAR EVENTS") and computes when they elapse. It is the schedule
// language of Umbra's jobs: `hourly`, `Mon..Fri 07,12:00`, `*:0/15`,
// `*-*~01 23:00 Europe/Berlin`.
//
// No maintained Go library parses this syntax (robfig/cron and its
// forks parse cron lines, which cannot say "the last day of the month"
// or "every 15 minutes in Berlin time"), so the parser is Umbra's own.
// It follows systemd 252's calendarspec.c closely enough that an
// expression is accepted exactly when systemd accepts it (local time
// zone abbreviations such as CET aside), String returns what
// `systemd-analyze calendar` prints as "Normalized form", and Next
// returns the elapses systemd's timers compute; calendar_test.go checks
// all three against the real systemd-analyze.
//
// Supported: the shorthands minutely, hourly, daily, weekly, monthly,
// quarterly, semiannually (semi-annually), yearly (annually); weekday
// lists and ranges (Mon..Fri,Sun; full names; any case); dates
// YEAR-MONTH-DAY and MONTH-DAY with `*`, lists `1,15`, ranges `1..5`,
// repetitions `/step`, `~` for days counted from the end of the month
// (`*-*~01` is the last day); times HOUR:MINUTE[:SECOND] with the same
// operators and fractional seconds; `@UNIXSECONDS`; and a trailing
// time zone, `UTC` or an IANA name (Europe/Berlin). Without a zone an
// expression is in the zone given to ParseInLocation, time.Local for
// Parse.
//
// Differences: when a repetition runs past the end of its field and
// the carry crosses two fields (seconds past 59 at minute 59, minutes
// past 59 in hour 23, days past the end of December), systemd 252
// resumes from the overflowed time and skips the list's earlier items
// (`*:*:11,29/25` after 22:59:54 elapses at 23:00:29, `*-*-1/7` after
// 30 December on 8 January); Next returns 23:00:11 and 1 January, as
// both do when the carry crosses one field. And systemd also reads the
// machine's own zone abbreviations (CET, CEST when the machine is in
// Berlin) as "this zone, in standard or summer time"; here a last word
// is only ever a tz database name (UTC, Europe/Berlin, and the few
// abbreviations the database has as zones, such as CET or EST).
//
// systemd refuses some lists of days counted from the end of the month
// that look valid (`*-*~01,26`: its bound tightens by 3 days per list
// item); Parse refuses the same ones, with an error naming the item.
//
// Time zone transitions follow systemd: the search runs on the wall
// clock, a wall time that does not exist (the hour skipped when clocks
// go forward) never elapses, and a wall time that happens twice (the
// hour repeated when clocks go back) elapses once, at its first
// occurrence after the base time, so a schedule neither skips nor
// repeats a wall time.
package calendar
