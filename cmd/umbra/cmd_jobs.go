package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/timestamppb"

	"umbra/api/umbrav1"
)

func init() { verbs = append(verbs, newJobsCmd) }

func newJobsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "jobs",
		Short: "Scheduled jobs: snapshot timelines, backups, verifies ([[job]] tables of the service's config, or umbra jobs add)",
	}
	cmd.AddCommand(newJobsListCmd(), newJobsShowCmd(), newJobsRunCmd(), newJobsHistoryCmd(),
		newJobsEnableCmd("enable", true), newJobsEnableCmd("disable", false), newJobsAddCmd(), newJobsRemoveCmd())
	return cmd
}

// when formats a time for a table ("-" for none).
func when(t *timestamppb.Timestamp) string {
	if t == nil {
		return "-"
	}
	return t.AsTime().Local().Format(time.DateTime)
}

func runSummary(r *umbrav1.JobRun) string {
	if r == nil {
		return "-"
	}
	return fmt.Sprintf("%s %s", r.Result, when(r.End))
}

func newJobsListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the jobs: schedule, state, last run, last success, next run",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				resp, err := c.ListJobs(ctx, &umbrav1.ListJobsRequest{})
				if err != nil {
					return err
				}
				if gflags.json {
					return printJSON(os.Stdout, resp)
				}
				w := table()
				fmt.Fprintln(w, "JOB\tKIND\tSCHEDULE\tSTATE\tLAST RUN\tLAST SUCCESS\tNEXT RUN\tDEFINED IN")
				for _, j := range resp.Jobs {
					state := "enabled"
					switch {
					case j.Running != nil:
						state = fmt.Sprintf("running #%d", j.Running.Seq)
					case !j.Enabled:
						state = "disabled"
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", j.Name, j.Kind, j.Schedule, state, runSummary(j.Last), when(j.LastSuccess), when(j.Next), j.Source)
				}
				return w.Flush()
			})
		},
	}
}

func newJobsShowCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "show NAME",
		Short: "Show a job: its definition, state and last runs",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				j, err := c.GetJob(ctx, &umbrav1.GetJobRequest{Name: args[0]})
				if err != nil {
					return err
				}
				if gflags.json {
					return printJSON(os.Stdout, j)
				}
				w := table()
				fmt.Fprintf(w, "job\t%s (%s)\n", j.Name, j.Kind)
				fmt.Fprintf(w, "schedule\t%s\n", j.Schedule)
				fmt.Fprintf(w, "enabled\t%v\n", j.Enabled)
				fmt.Fprintf(w, "defined in\t%s\n", j.Source)
				if j.Running != nil {
					fmt.Fprintf(w, "running\trun %d since %s (%s)\n", j.Running.Seq, when(j.Running.Start), j.Running.Trigger)
				}
				fmt.Fprintf(w, "last run\t%s\n", runLine(j.Last))
				fmt.Fprintf(w, "last success\t%s\n", when(j.LastSuccess))
				fmt.Fprintf(w, "next run\t%s\n", when(j.Next))
				w.Flush()
				fmt.Printf("\n%s", j.Definition)
				return nil
			})
		},
	}
}

// runLine is one run in a sentence.
func runLine(r *umbrav1.JobRun) string {
	if r == nil {
		return "-"
	}
	s := fmt.Sprintf("#%d %s (%s) %s", r.Seq, r.Result, r.Trigger, when(r.Start))
	if r.End != nil && r.Start != nil {
		s += fmt.Sprintf(", took %s", r.End.AsTime().Sub(r.Start.AsTime()).Round(time.Millisecond))
	}
	if r.Error != "" {
		s += ": " + r.Error
	} else if r.Detail != "" {
		s += ": " + r.Detail
	}
	return s
}

func newJobsRunCmd() *cobra.Command {
	var wait bool
	cmd := &cobra.Command{
		Use:   "run NAME",
		Short: "Start a run of a job now (with --wait, wait for it and exit 1 unless it succeeds)",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			var before uint64
			var run *umbrav1.JobRun
			err := call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				h, err := c.JobHistory(ctx, &umbrav1.JobHistoryRequest{Name: name, Limit: 1})
				if err != nil {
					return err
				}
				if len(h.Runs) > 0 {
					before = h.Runs[0].Seq
				}
				_, err = c.RunJob(ctx, &umbrav1.RunJobRequest{Name: name})
				return err
			})
			if err != nil || !wait {
				if err == nil {
					if gflags.json {
						return printJSON(os.Stdout, map[string]any{"job": name, "started": true})
					}
					fmt.Printf("job %s started (umbra jobs show %s)\n", name, name)
				}
				return err
			}
			err = callCtx(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				for {
					h, err := c.JobHistory(ctx, &umbrav1.JobHistoryRequest{Name: name, Limit: 5})
					if err != nil {
						return err
					}
					for _, r := range h.Runs {
						if r.Seq > before && r.Trigger == "manual" && r.Result != "running" {
							run = r
							return nil
						}
					}
					select {
					case <-ctx.Done():
						return ctx.Err()
					case <-time.After(500 * time.Millisecond):
					}
				}
			})
			if err != nil {
				return err
			}
			if gflags.json {
				if err := printJSON(os.Stdout, run); err != nil {
					return err
				}
			} else {
				fmt.Println(runLine(run))
			}
			if run.Result != "success" {
				return fmt.Errorf("job %s run %d %s: %s", name, run.Seq, run.Result, run.Error)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "wait for the run to end; exit 1 unless it succeeded")
	return cmd
}

func newJobsHistoryCmd() *cobra.Command {
	var limit int32
	cmd := &cobra.Command{
		Use:   "history [NAME]",
		Short: "List recorded runs, newest first: start, end, trigger, result, bytes, error",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if limit < 0 {
				return usageError{errors.New("--limit: want 0 (all kept) or more")}
			}
			var name string
			if len(args) == 1 {
				name = args[0]
			}
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				resp, err := c.JobHistory(ctx, &umbrav1.JobHistoryRequest{Name: name, Limit: limit})
				if err != nil {
					return err
				}
				if gflags.json {
					return printJSON(os.Stdout, resp)
				}
				w := table()
				fmt.Fprintln(w, "JOB\tRUN\tTRIGGER\tSTART\tTOOK\tRESULT\tBYTES\tERROR / DETAIL")
				for _, r := range resp.Runs {
					took := "-"
					if r.End != nil {
						took = r.End.AsTime().Sub(r.Start.AsTime()).Round(time.Millisecond).String()
					}
					msg := r.Error
					if msg == "" {
						msg = r.Detail
					}
					fmt.Fprintf(w, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Job, r.Seq, r.Trigger, when(r.Start), took, r.Result, human(r.Bytes), oneLine(msg))
				}
				return w.Flush()
			})
		},
	}
	cmd.Flags().Int32Var(&limit, "limit", 20, "at most this many runs (0: all kept)")
	return cmd
}

func oneLine(s string) string { return strings.ReplaceAll(s, "\n", " ") }

func newJobsEnableCmd(verb string, on bool) *cobra.Command {
	what := "Enable a job: it runs on its schedule again"
	if !on {
		what = "Disable a job: no scheduled runs until enabled (a run in progress goes on)"
	}
	return &cobra.Command{
		Use:   verb + " NAME",
		Short: what,
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				j, err := c.SetJobEnabled(ctx, &umbrav1.SetJobEnabledRequest{Name: args[0], Enabled: on})
				if err != nil {
					return err
				}
				if gflags.json {
					return printJSON(os.Stdout, j)
				}
				fmt.Printf("job %s %sd; next run %s\n", j.Name, verb, when(j.Next))
				return nil
			})
		},
	}
}

// exactArgs wants n arguments, named in the error (exit 2).
func exactArgs(n int, names string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageError{fmt.Errorf("%s: want %s (%d argument(s)), got %d", cmd.CommandPath(), names, n, len(args))}
		}
		return nil
	}
}

func newJobsAddCmd() *cobra.Command {
	var from string
	cmd := &cobra.Command{
		Use:   "add NAME --from-file JOB.toml",
		Short: "Define a job through the API: one [[job]] table, kept over restarts and scheduled at once",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if from == "" {
				return usageError{errors.New("jobs add: give --from-file JOB.toml (one [[job]] table, as in the config file)")}
			}
			text, err := os.ReadFile(from)
			if err != nil {
				return usageError{fmt.Errorf("--from-file: %w", err)}
			}
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				j, err := c.AddJob(ctx, &umbrav1.AddJobRequest{Name: args[0], Definition: string(text)})
				if err != nil {
					return err
				}
				if gflags.json {
					return printJSON(os.Stdout, j)
				}
				fmt.Printf("job %s added (%s, %s); next run %s\n", j.Name, j.Kind, j.Schedule, when(j.Next))
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&from, "from-file", "", "the job's definition: one [[job]] table in TOML")
	return cmd
}

func newJobsRemoveCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "remove NAME",
		Short: "Remove a job defined with umbra jobs add (its run history stays until it ages out)",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				resp, err := c.RemoveJob(ctx, &umbrav1.RemoveJobRequest{Name: args[0]})
				if err != nil {
					return err
				}
				if gflags.json {
					return printJSON(os.Stdout, resp)
				}
				fmt.Printf("job %s removed\n", args[0])
				return nil
			})
		},
	}
}
