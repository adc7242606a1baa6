// Package jobs runs a service's unattended work: snapshot timelines,
// backups with prune, repository verification and copies into another
// repository (sync: the offsite copy of `umbra copy`), each on a schedule
// in systemd's calendar syntax (jobs/calendar), started by the scheduler
// (jobs/sched: catch-up of a run missed while the service was down, no
// overlap, random delay), recorded in the catalog and told of when it
// goes wrong.
//
// A job is a Def, a [[job]] table of the service's TOML config; Check
// refuses a bad one with a *DefError that names the job and the field.
// Whether a job is enabled is the catalog's (umbra jobs enable|disable),
// over the definition's disabled.
//
// Every run is a Run record in the catalog, written when it starts
// (result "running") and again when it ends, keeping the last
// Def.History runs per job. A record still "running" when a Manager is
// made was left by a service that died mid-run: it becomes
// "interrupted". A run that ends otherwise than in success — failed,
// skipped because the previous one still ran, missed, interrupted,
// cancelled — is an event (Config.Emit), a metric (Config.Metrics), a
// log line and a notification (Config.Notify: webhook and exec hook,
// package notify).
//
// Jobs act through the service's API (the API interface, which
// *api.Server implements): snapshot sets come from the coordinator, the
// only path that makes them, and deletions pass the checks of `umbra
// snapshot delete`. Repositories are opened as `umbra backup` opens
// them (repoSettings).
//
// Adding a kind: write one file, KIND.go, with an init that registers a
// Kind (its name, a Check that refuses the Def fields it cannot use —
// unused() for the ones it does not read — and a Run), and add to Def
// the fields the kind needs, each with its toml tag, named in unused's
// table so that other kinds refuse it. snapshot.go, backup.go and
// verify.go are the models. Nothing else changes: the API, the CLI, the
// history and the alerts are the same for every kind.
package jobs
