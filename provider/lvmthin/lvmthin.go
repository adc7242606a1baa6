// Package lvmthin is a system provider for LVM thin volumes: a thin LV
// ("VG/LV") is a volume; committing a snapshot makes a thin snapshot
// (lvcreate -s, O(1): the pool shares every block until one is written);
// delete removes it (lvremove); revert merges it into the volume
// (lvconvert --merge, keeping a thin copy of the snapshot under its name).
// Snapshots are block devices, opened read-only as images; changed blocks
// between snapshots come from the pool's metadata (thin_delta).
//
// Snapshots are found by their LVM tags, not their names: umbra_vol:VG/LV
// names the volume, umbra_id:ID the snapshot, umbra_seq:N orders them
// (nanoseconds at commit) and umbra_set:SET records the snapshot set. The
// LV of snapshot ID of VG/LV is VG/LV_umbra_ID.
package lvmthin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"umbra/provider"
)

// Name is the provider's name.
const Name = "lvmthin"

const (
	tagVol = "umbra_vol:"
	tagID  = "umbra_id:"
	tagSeq = "umbra_seq:"
	tagSet = "umbra_set:"
)

// Provider implements provider.Provider over LVM thin volumes.
type Provider struct {
	mu   sync.Mutex      // guards vols, seq
	vols map[string]bool // "VG/LV" of the volumes added
	seq  int
}

var _ provider.Provider = (*Provider)(nil)

// New returns a provider with no volumes.
func New() *Provider { return &Provider{vols: map[string]bool{}} }

func lvm(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "lvm", args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("lvm %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Add registers the thin LV vol, written VG/LV.
func (p *Provider) Add(ctx context.Context, vol string) error {
	vg, lv, ok := strings.Cut(vol, "/")
	if !ok || vg == "" || lv == "" || strings.Contains(lv, "/") {
		return fmt.Errorf("lvmthin volume %q: name it VG/LV", vol)
	}
	if _, err := exec.LookPath("lvm"); err != nil {
		return errors.New("lvmthin provider: the lvm tool is missing (apt-get install lvm2 thin-provisioning-tools)")
	}
	out, err := lvm(ctx, "lvs", "--noheadings", "-o", "segtype", vol)
	if err != nil {
		return fmt.Errorf("lvmthin volume %s: %w", vol, err)
	}
	if seg := strings.TrimSpace(out); seg != "thin" {
		return fmt.Errorf("lvmthin volume %s is a %q LV, not a thin LV (lvcreate -V SIZE -T VG/POOL -n LV makes one)", vol, seg)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.vols[vol] = true
	return nil
}

func (p *Provider) Name() string { return Name }

// Volumes lists the volumes added, sorted.
func (p *Provider) Volumes() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Sorted(maps.Keys(p.vols))
}

func (p *Provider) Capabilities() provider.Capabilities {
	return provider.Capabilities{
		Kind: "system", CommitCost: "O(1) (thin snapshot)", Revert: true, BlockImage: true, Tracking: true,
		Persistent: true, Notes: "thin LVs (VG/LV); snapshots share the thin pool; revert merges (lvconvert --merge) and needs the LV unused",
	}
}

func (p *Provider) check(vol string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.vols[vol] {
		return fmt.Errorf("lvmthin volume %s: %w", vol, provider.ErrNotFound)
	}
	return nil
}

func (p *Provider) Supports(ctx context.Context, vol string) error { return p.check(vol) }

// snap is one snapshot LV.
type snap struct {
	provider.Snapshot
	lv  string // the snapshot's LV name
	seq int64
}

// dmPath is the device-mapper node of VG/LV (present without udev too).
func dmPath(vg, lv string) string {
	return "/dev/mapper/" + strings.ReplaceAll(vg, "-", "--") + "-" + strings.ReplaceAll(lv, "-", "--")
}

// snaps lists vol's snapshots, oldest first.
func (p *Provider) snaps(ctx context.Context, vol string) ([]snap, error) {
	if err := p.check(vol); err != nil {
		return nil, err
	}
	vg, _, _ := strings.Cut(vol, "/")
	out, err := lvm(ctx, "lvs", "--noheadings", "--separator", "|", "--units", "b", "--nosuffix",
		"-o", "lv_name,lv_tags,lv_size", vg)
	if err != nil {
		return nil, err
	}
	var all []snap
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(strings.TrimSpace(line), "|")
		if len(f) != 3 {
			continue
		}
		s := snap{lv: f[0], Snapshot: provider.Snapshot{Volume: vol, Provider: Name, Persistent: true, Valid: true}}
		mine := false
		for _, tag := range strings.Split(f[1], ",") {
			switch {
			case tag == tagVol+vol:
				mine = true
			case strings.HasPrefix(tag, tagID):
				s.ID = strings.TrimPrefix(tag, tagID)
			case strings.HasPrefix(tag, tagSeq):
				s.seq, _ = strconv.ParseInt(strings.TrimPrefix(tag, tagSeq), 10, 64)
			case strings.HasPrefix(tag, tagSet):
				s.SetID = strings.TrimPrefix(tag, tagSet)
			}
		}
		if !mine || s.ID == "" {
			continue
		}
		s.Size, _ = strconv.ParseInt(f[2], 10, 64)
		s.Created = time.Unix(0, s.seq).UTC()
		s.Path = dmPath(vg, s.lv)
		all = append(all, s)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].seq < all[j].seq })
	return all, nil
}

func (p *Provider) find(ctx context.Context, vol, id string) (snap, error) {
	all, err := p.snaps(ctx, vol)
	if err != nil {
		return snap{}, err
	}
	for _, s := range all {
		if s.ID == id {
			return s, nil
		}
	}
	return snap{}, fmt.Errorf("snapshot %s@%s: %w", vol, id, provider.ErrNotFound)
}

func (p *Provider) List(ctx context.Context, vol string) ([]provider.Snapshot, error) {
	all, err := p.snaps(ctx, vol)
	if err != nil {
		return nil, err
	}
	out := make([]provider.Snapshot, len(all))
	for i, s := range all {
		out[i] = s.Snapshot
	}
	return out, nil
}

func (p *Provider) Prepare(ctx context.Context, vol string, opts provider.SnapshotOptions) (provider.Txn, error) {
	if err := p.check(vol); err != nil {
		return nil, err
	}
	if opts.ID == "" {
		p.mu.Lock()
		p.seq++
		opts.ID = fmt.Sprintf("snap-%d-%d", time.Now().Unix(), p.seq)
		p.mu.Unlock()
	}
	if err := provider.ValidateID(opts.ID); err != nil {
		return nil, fmt.Errorf("snapshot of %s: %w", vol, err)
	}
	if _, err := p.find(ctx, vol, opts.ID); err == nil {
		return nil, fmt.Errorf("snapshot %s@%s: %w", vol, opts.ID, provider.ErrExists)
	}
	vg, lv, _ := strings.Cut(vol, "/")
	return &txn{p: p, vol: vol, vg: vg, lv: lv, id: opts.ID, setID: opts.SetID}, nil
}

type txn struct {
	p               *Provider
	vol, vg, lv, id string
	setID           string
	committed       bool
}

func (t *txn) snapLV() string { return t.lv + "_umbra_" + t.id }

// PreCommit writes back the LV's dirty pages and flushes its cache.
// lvcreate then suspends the LV for the instant of the snapshot, and
// device-mapper's suspend freezes a filesystem mounted on it (so its
// snapshot is clean); a filesystem frozen beforehand (fsfreeze) makes
// that suspend fail with EBUSY, so filesystem writers stay out.
func (t *txn) PreCommit(ctx context.Context, limit time.Duration) error {
	f, err := os.Open(dmPath(t.vg, t.lv))
	if err != nil {
		return fmt.Errorf("flush %s before its snapshot: %w", t.vol, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("flush %s before its snapshot: %w", t.vol, err)
	}
	return nil
}

func (t *txn) Commit(ctx context.Context) (provider.Snapshot, error) {
	args := []string{"lvcreate", "-q", "-s", "-n", t.snapLV(),
		"--addtag", tagVol + t.vol, "--addtag", tagID + t.id,
		"--addtag", tagSeq + strconv.FormatInt(time.Now().UnixNano(), 10)}
	if t.setID != "" {
		args = append(args, "--addtag", tagSet+t.setID)
	}
	if _, err := lvm(ctx, append(args, t.vol)...); err != nil {
		return provider.Snapshot{}, fmt.Errorf("snapshot %s@%s: %w", t.vol, t.id, err)
	}
	t.committed = true
	s, err := t.p.find(ctx, t.vol, t.id)
	return s.Snapshot, err
}

func (t *txn) PostCommit(ctx context.Context) error { return nil }

func (t *txn) Abort(ctx context.Context) error {
	if !t.committed {
		return nil
	}
	t.committed = false
	_, err := lvm(ctx, "lvremove", "-q", "-y", t.vg+"/"+t.snapLV())
	return err
}

func (p *Provider) Delete(ctx context.Context, vol, id string) error {
	s, err := p.find(ctx, vol, id)
	if err != nil {
		return err
	}
	vg, _, _ := strings.Cut(vol, "/")
	_, err = lvm(ctx, "lvremove", "-q", "-y", vg+"/"+s.lv)
	return err
}

type image struct {
	f    *os.File
	size int64
}

func (i *image) ReadAt(p []byte, off int64) (int, error) { return i.f.ReadAt(p, off) }
func (i *image) Size() int64                             { return i.size }
func (i *image) Close() error                            { return i.f.Close() }

// Open activates the snapshot (thin snapshots skip activation by default)
// and opens its device read-only.
func (p *Provider) Open(ctx context.Context, vol, id string) (provider.Image, error) {
	s, err := p.find(ctx, vol, id)
	if err != nil {
		return nil, err
	}
	vg, _, _ := strings.Cut(vol, "/")
	if _, err := lvm(ctx, "lvchange", "-q", "-ay", "-K", vg+"/"+s.lv); err != nil {
		return nil, fmt.Errorf("open %s@%s: %w", vol, id, err)
	}
	f, err := os.Open(s.Path)
	if err != nil {
		return nil, fmt.Errorf("open %s@%s: %w", vol, id, err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open %s@%s: %w", vol, id, err)
	}
	return &image{f: f, size: size}, nil
}

// Revert merges snapshot id into the volume. The LV must be unused: it is
// deactivated first (refused while mounted or open), so that the merge
// happens at once rather than at its next activation. The snapshot
// survives (a thin copy of it takes its name); later snapshots are deleted.
func (p *Provider) Revert(ctx context.Context, vol, id string) error {
	all, err := p.snaps(ctx, vol)
	if err != nil {
		return err
	}
	var target *snap
	var later []snap
	for i := range all {
		if target != nil {
			later = append(later, all[i])
		}
		if all[i].ID == id {
			target = &all[i]
		}
	}
	if target == nil {
		return fmt.Errorf("snapshot %s@%s: %w", vol, id, provider.ErrNotFound)
	}
	vg, lv, _ := strings.Cut(vol, "/")
	if _, err := lvm(ctx, "lvchange", "-q", "-an", vol); err != nil {
		return fmt.Errorf("revert %s: the LV is in use (umount it, close what has it open): %w", vol, err)
	}
	reactivate := func() error {
		if _, err := lvm(ctx, "lvchange", "-q", "-ay", vol); err != nil {
			return fmt.Errorf("revert %s: activate the LV again: %w", vol, err)
		}
		return nil
	}
	// The copy that keeps the snapshot after the merge consumes it.
	keep := lv + "_umbra_revert"
	args := []string{"lvcreate", "-q", "-s", "-n", keep, "--addtag", tagVol + vol, "--addtag", tagID + id,
		"--addtag", tagSeq + strconv.FormatInt(target.seq, 10)}
	if target.SetID != "" {
		args = append(args, "--addtag", tagSet+target.SetID)
	}
	if _, err := lvm(ctx, append(args, vg+"/"+target.lv)...); err != nil {
		return errors.Join(fmt.Errorf("revert %s: keep a copy of %s: %w", vol, id, err), reactivate())
	}
	// The target no longer counts as the snapshot: the copy does.
	if _, err := lvm(ctx, "lvchange", "-q", "--deltag", tagVol+vol, vg+"/"+target.lv); err != nil {
		lvm(ctx, "lvremove", "-q", "-y", vg+"/"+keep)
		return errors.Join(fmt.Errorf("revert %s: %w", vol, err), reactivate())
	}
	if _, err := lvm(ctx, "lvconvert", "-q", "-y", "--merge", vg+"/"+target.lv); err != nil {
		lvm(ctx, "lvchange", "-q", "--addtag", tagVol+vol, vg+"/"+target.lv)
		lvm(ctx, "lvremove", "-q", "-y", vg+"/"+keep)
		return errors.Join(fmt.Errorf("revert %s to %s: %w", vol, id, err), reactivate())
	}
	if err := reactivate(); err != nil {
		return err
	}
	var errs []error
	if _, err := lvm(ctx, "lvrename", "-q", vg, keep, target.lv); err != nil {
		errs = append(errs, fmt.Errorf("revert %s: name the kept snapshot %s: %w", vol, target.lv, err))
	}
	for _, s := range later {
		if _, err := lvm(ctx, "lvremove", "-q", "-y", vg+"/"+s.lv); err != nil {
			errs = append(errs, fmt.Errorf("revert %s: delete the later snapshot %s: %w", vol, s.ID, err))
		}
	}
	return errors.Join(errs...)
}

var _ provider.Tracker = (*Provider)(nil)

var deltaRE = regexp.MustCompile(`<(different|left_only|right_only) begin="(\d+)" length="(\d+)"`)

// Changed lists the pool chunks that differ between snapshot since and
// snapshot upto (empty: the live LV), from the thin pool's metadata
// (thin_delta on a metadata snapshot): what a thin LV's incremental image
// backup has to read. The LVs are flushed first, so that the pool has
// committed the mappings of every write they acknowledged.
func (p *Provider) Changed(ctx context.Context, vol, since, upto string) (*provider.Bitmap, bool, error) {
	from, err := p.find(ctx, vol, since)
	if err != nil {
		return nil, false, err
	}
	vg, lv, _ := strings.Cut(vol, "/")
	toLV := lv
	if upto != "" {
		to, err := p.find(ctx, vol, upto)
		if err != nil {
			return nil, false, err
		}
		toLV = to.lv
	}
	out, err := lvm(ctx, "lvs", "--noheadings", "--separator", "|", "--units", "b", "--nosuffix",
		"-o", "lv_name,thin_id,pool_lv,lv_size", vg)
	if err != nil {
		return nil, false, err
	}
	ids := map[string]string{}
	var pool string
	var size int64
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(strings.TrimSpace(line), "|")
		if len(f) != 4 {
			continue
		}
		ids[f[0]] = f[1]
		if f[0] == lv {
			pool = f[2]
			size, _ = strconv.ParseInt(f[3], 10, 64)
		}
	}
	id1, id2 := ids[from.lv], ids[toLV]
	if id1 == "" || id2 == "" || pool == "" {
		return nil, false, fmt.Errorf("changed blocks of %s: no thin ids for %s and %s in %s", vol, from.lv, toLV, vg)
	}
	cs, err := lvm(ctx, "lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "chunk_size", vg+"/"+pool)
	if err != nil {
		return nil, false, err
	}
	chunk, err := strconv.ParseInt(strings.TrimSpace(cs), 10, 64)
	if err != nil || chunk <= 0 {
		return nil, false, fmt.Errorf("changed blocks of %s: chunk size of %s/%s: %q", vol, vg, pool, cs)
	}
	// The live LV's acknowledged writes: a flush makes the pool commit
	// their mappings (a snapshot's are committed when it is made).
	if upto == "" {
		f, err := os.Open(dmPath(vg, lv))
		if err != nil {
			return nil, false, fmt.Errorf("changed blocks of %s: %w", vol, err)
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return nil, false, fmt.Errorf("changed blocks of %s: flush: %w", vol, err)
		}
	}
	tpool := dmPath(vg, pool) + "-tpool"
	if _, err := os.Stat(tpool); err != nil {
		tpool = dmPath(vg, pool)
	}
	tmeta := dmPath(vg, pool+"_tmeta")
	dm := func(msg string) error {
		b, err := exec.CommandContext(ctx, "dmsetup", "message", tpool, "0", msg).CombinedOutput()
		if err != nil {
			return fmt.Errorf("dmsetup message %s 0 %s: %v: %s", tpool, msg, err, strings.TrimSpace(string(b)))
		}
		return nil
	}
	if err := dm("reserve_metadata_snap"); err != nil {
		return nil, false, fmt.Errorf("changed blocks of %s: %w", vol, err)
	}
	xml, derr := exec.CommandContext(ctx, "thin_delta", "-m", "--snap1", id1, "--snap2", id2, tmeta).CombinedOutput()
	rerr := dm("release_metadata_snap")
	if derr != nil {
		return nil, false, fmt.Errorf("changed blocks of %s: thin_delta: %v: %s", vol, derr, strings.TrimSpace(string(xml)))
	}
	if rerr != nil {
		return nil, false, fmt.Errorf("changed blocks of %s: %w", vol, rerr)
	}
	n := (size + chunk - 1) / chunk
	bm := &provider.Bitmap{Granule: chunk, Size: size, Bits: make([]uint64, (n+63)/64)}
	for _, m := range deltaRE.FindAllStringSubmatch(string(xml), -1) {
		begin, _ := strconv.ParseInt(m[2], 10, 64)
		length, _ := strconv.ParseInt(m[3], 10, 64)
		for i := begin; i < begin+length && i < n; i++ {
			bm.Bits[i/64] |= 1 << (uint(i) % 64)
		}
	}
	return bm, true, nil
}
