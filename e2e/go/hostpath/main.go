// csi-hostpath: a CSI controller for the test cluster, in the image of the upstream CSI hostpath
// driver (whose module the Go proxy here does not serve). Same contract as upstream, which the
// node agent and the tests rely on:
//   - a volume is the directory <statedir>/<volumeID>;
//   - a snapshot is a gzipped tar of that directory, <statedir>/<snapshotID>.snap: a fuzzy,
//     non-atomic copy (files may change while tar reads them), the case backup mode exists for;
//   - VolumeSnapshotClass parameter ignoreFailedRead=true lets tar skip files removed under it.
//
// Class parameters also give it the behaviours of real drivers, for pgsnap's failure tests:
//   - uploadSeconds=N: the snapshot is cut (creationTime set) when the tar ends, and ready to
//     use only N seconds later, as cloud block storage uploads after the cut;
//   - cutSeconds=N: the cut itself takes N seconds more (a slow storage), during which
//     PostgreSQL stays in backup mode;
//   - cut=reflink: the cut is a copy-on-write copy (cp --reflink=always, a directory
//     <reflinkdir>/<snapshotID>.snap.d), O(files) rather than O(bytes), as block storage cuts;
//     the volume must have been made by a StorageClass with parameter reflink=true, which puts
//     it on --reflink-dir (XFS with reflink) behind a link at <statedir>/<volumeID>;
//   - neverReady=true: cut, and never ready;
//   - failWith=MESSAGE: CreateSnapshot fails with MESSAGE.
//
// Group snapshots (the CSI GroupController service, VolumeGroupSnapshot): a group is one
// snapshot per source volume, cut by the same code with the same class parameters, all started
// at once (one goroutine each); CreateVolumeGroupSnapshot answers when every member is cut, and
// if one fails the others are removed and the call fails. The members are cut concurrently, not
// at one instant: a group is as fuzzy across volumes as one tar is across files. This storage
// cannot cut several volumes atomically; real drivers with group snapshots cut them all at one
// instant (crash-consistent). Here correctness comes from PostgreSQL's backup mode, as for one
// volume. A member is an ordinary snapshot too (ListSnapshots, DeleteSnapshot, restore).
//
// The identity, controller and group controller services are served: the node agent
// bind-mounts volume directories itself, so no NodePublish is needed.
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

const defaultSize = 1 << 30

type volume struct {
	ID       string `json:"id"`
	Name     string `json:"name"`
	Size     int64  `json:"size"`
	Path     string `json:"path"`
	Source   string `json:"source,omitempty"` // snapshot or volume it was created from
	PVC      string `json:"pvc,omitempty"`    // namespace/name, from --extra-create-metadata
	Creation string `json:"creation"`
}

type snapshot struct {
	ID       string    `json:"id"`
	Name     string    `json:"name"`
	VolumeID string    `json:"volumeId"`
	Group    string    `json:"group,omitempty"` // the group snapshot it is a member of
	Size     int64     `json:"size"`
	Path     string    `json:"path"`
	Created  time.Time `json:"created"`
	// Cut: the tar is whole. Ready: uploaded; or it will be at ReadyAt (nil: never).
	Cut     bool       `json:"cut"`
	Ready   bool       `json:"ready"`
	ReadyAt *time.Time `json:"readyAt,omitempty"`
}

// ready says whether the snapshot is ready to use now.
func (s *snapshot) ready() bool {
	return s.Ready || (s.Cut && s.ReadyAt != nil && !time.Now().Before(*s.ReadyAt))
}

// A group snapshot: one snapshot per source volume, cut concurrently.
type group struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	VolumeIDs []string  `json:"volumeIds"`
	Snapshots []string  `json:"snapshots"` // member snapshot ids, in the order of VolumeIDs
	Created   time.Time `json:"created"`   // when the first member's cut started
	// Cut: every member is cut. Until then the group is being cut (or its call was cut short).
	Cut bool `json:"cut"`
}

type state struct {
	Volumes   map[string]*volume   `json:"volumes"`
	Snapshots map[string]*snapshot `json:"snapshots"`
	Groups    map[string]*group    `json:"groups"` // absent from a state.json written before groups
}

type driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer
	csi.UnimplementedGroupControllerServer

	name, version, nodeID, dir string
	// An XFS file system with reflink, for reflink volumes and their snapshots; "" if none.
	reflinkDir string

	mu sync.Mutex
	st state
}

func (d *driver) statePath() string { return filepath.Join(d.dir, "state.json") }

func (d *driver) load() error {
	d.st = state{Volumes: map[string]*volume{}, Snapshots: map[string]*snapshot{}, Groups: map[string]*group{}}
	b, err := os.ReadFile(d.statePath())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, &d.st); err != nil {
		return fmt.Errorf("%s: %w", d.statePath(), err)
	}
	if d.st.Volumes == nil {
		d.st.Volumes = map[string]*volume{}
	}
	if d.st.Snapshots == nil {
		d.st.Snapshots = map[string]*snapshot{}
	}
	if d.st.Groups == nil {
		d.st.Groups = map[string]*group{}
	}
	// A group whose cut a restart cut short failed as a whole: its members go with it.
	for id, g := range d.st.Groups {
		if !g.Cut {
			for _, sid := range g.Snapshots {
				if s, ok := d.st.Snapshots[sid]; ok {
					os.RemoveAll(s.Path)
					delete(d.st.Snapshots, sid)
				}
			}
			delete(d.st.Groups, id)
		}
	}
	// A snapshot whose tar was cut short by a restart is worthless.
	for id, s := range d.st.Snapshots {
		s.Cut = s.Cut || s.Ready
		if !s.Cut {
			os.RemoveAll(s.Path)
			delete(d.st.Snapshots, id)
		}
	}
	return nil
}

// save is called with mu held; write-then-rename so a crash never leaves half a file.
func (d *driver) save() error {
	b, err := json.MarshalIndent(d.st, "", "  ")
	if err != nil {
		return err
	}
	tmp := d.statePath() + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, d.statePath())
}

func newID() string {
	b := make([]byte, 16)
	rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// ---- identity

func (d *driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: d.name, VendorVersion: d.version}, nil
}

func (d *driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{
		{Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_CONTROLLER_SERVICE}}},
		{Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_GROUP_CONTROLLER_SERVICE}}},
		{Type: &csi.PluginCapability_VolumeExpansion_{VolumeExpansion: &csi.PluginCapability_VolumeExpansion{Type: csi.PluginCapability_VolumeExpansion_ONLINE}}},
	}}, nil
}

func (d *driver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{}, nil
}

// ---- controller

func (d *driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, c := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: c}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

func checkCaps(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return status.Error(codes.InvalidArgument, "volume capabilities missing")
	}
	for _, c := range caps {
		if c.GetBlock() != nil {
			return status.Error(codes.InvalidArgument, "block volumes are not supported: a volume is a directory")
		}
	}
	return nil
}

func (d *driver) volumeResponse(v *volume, src *csi.VolumeContentSource) *csi.CreateVolumeResponse {
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{VolumeId: v.ID, CapacityBytes: v.Size, ContentSource: src}}
}

func (d *driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if req.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "name missing")
	}
	if err := checkCaps(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	size := req.GetCapacityRange().GetRequiredBytes()
	if size == 0 {
		size = defaultSize
	}
	src := req.GetVolumeContentSource()

	d.mu.Lock()
	defer d.mu.Unlock()
	for _, v := range d.st.Volumes {
		if v.Name == req.GetName() {
			if v.Size < size {
				return nil, status.Errorf(codes.AlreadyExists, "volume %s exists with a smaller size", v.Name)
			}
			return d.volumeResponse(v, src), nil
		}
	}
	v := &volume{ID: newID(), Name: req.GetName(), Size: size, Creation: time.Now().UTC().Format(time.RFC3339)}
	v.Path = filepath.Join(d.dir, v.ID)
	p := req.GetParameters()
	if ns, n := p["csi.storage.k8s.io/pvc/namespace"], p["csi.storage.k8s.io/pvc/name"]; n != "" {
		v.PVC = ns + "/" + n
	}
	if strings.EqualFold(p["reflink"], "true") {
		if d.reflinkDir == "" {
			return nil, status.Error(codes.InvalidArgument, "reflink volumes need --reflink-dir (an XFS file system with reflink)")
		}
		real := filepath.Join(d.reflinkDir, v.ID)
		if err := os.MkdirAll(real, 0o777); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		if err := os.Symlink(real, v.Path); err != nil {
			os.RemoveAll(real)
			return nil, status.Error(codes.Internal, err.Error())
		}
	}
	if err := os.MkdirAll(v.Path, 0o777); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	// Pods run as arbitrary users (PostgreSQL refuses root): the volume root is writable by all,
	// as on a fresh filesystem where fsGroup would otherwise apply.
	os.Chmod(v.Path, 0o777)
	fail := func(err error) (*csi.CreateVolumeResponse, error) {
		removeVolume(v.Path)
		return nil, err
	}
	switch {
	case src.GetSnapshot() != nil:
		s, ok := d.st.Snapshots[src.GetSnapshot().GetSnapshotId()]
		if !ok || !s.ready() {
			return fail(status.Errorf(codes.NotFound, "snapshot %s not found or not ready", src.GetSnapshot().GetSnapshotId()))
		}
		if s.Size > size {
			return fail(status.Errorf(codes.OutOfRange, "snapshot %s (%d bytes) is larger than the volume (%d)", s.ID, s.Size, size))
		}
		restore := exec.CommandContext(ctx, "tar", "-x", "-z", "-f", s.Path, "-C", v.Path)
		if info, err := os.Stat(s.Path); err == nil && info.IsDir() {
			// A reflink snapshot: shared blocks where the volume is on the same file system.
			restore = exec.CommandContext(ctx, "cp", "-a", "--reflink=auto", s.Path+"/.", v.Path)
		}
		if out, err := restore.CombinedOutput(); err != nil {
			return fail(status.Errorf(codes.Internal, "restoring snapshot %s: %v: %s", s.ID, err, out))
		}
		v.Source = "snapshot:" + s.ID
	case src.GetVolume() != nil:
		from, ok := d.st.Volumes[src.GetVolume().GetVolumeId()]
		if !ok {
			return fail(status.Errorf(codes.NotFound, "volume %s not found", src.GetVolume().GetVolumeId()))
		}
		if out, err := exec.CommandContext(ctx, "cp", "-a", from.Path+"/.", v.Path).CombinedOutput(); err != nil {
			return fail(status.Errorf(codes.Internal, "cloning volume %s: %v: %s", from.ID, err, out))
		}
		v.Source = "volume:" + from.ID
	}
	d.st.Volumes[v.ID] = v
	if err := d.save(); err != nil {
		return fail(status.Error(codes.Internal, err.Error()))
	}
	log.Printf("CreateVolume %s -> %s (%d bytes, pvc %s, source %q)", v.Name, v.Path, v.Size, v.PVC, v.Source)
	return d.volumeResponse(v, src), nil
}

func (d *driver) DeleteVolume(_ context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	v, ok := d.st.Volumes[req.GetVolumeId()]
	if !ok {
		return &csi.DeleteVolumeResponse{}, nil
	}
	if err := removeVolume(v.Path); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	delete(d.st.Volumes, v.ID)
	log.Printf("DeleteVolume %s (%s)", v.ID, v.Name)
	return &csi.DeleteVolumeResponse{}, d.save()
}

// removeVolume removes a volume directory, and for a reflink volume the directory its link
// points to.
func removeVolume(path string) error {
	if real, err := os.Readlink(path); err == nil {
		if err := os.RemoveAll(real); err != nil {
			return err
		}
	}
	return os.RemoveAll(path)
}

func (d *driver) ValidateVolumeCapabilities(_ context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	d.mu.Lock()
	_, ok := d.st.Volumes[req.GetVolumeId()]
	d.mu.Unlock()
	if !ok {
		return nil, status.Errorf(codes.NotFound, "volume %s not found", req.GetVolumeId())
	}
	if err := checkCaps(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext: req.GetVolumeContext(), VolumeCapabilities: req.GetVolumeCapabilities(), Parameters: req.GetParameters(),
	}}, nil
}

func (d *driver) ControllerExpandVolume(_ context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	v, ok := d.st.Volumes[req.GetVolumeId()]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "volume %s not found", req.GetVolumeId())
	}
	if n := req.GetCapacityRange().GetRequiredBytes(); n > v.Size {
		v.Size = n
	}
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: v.Size}, d.save()
}

func (s *snapshot) csi() *csi.Snapshot {
	return &csi.Snapshot{SnapshotId: s.ID, SourceVolumeId: s.VolumeID, SizeBytes: s.Size,
		CreationTime: timestamppb.New(s.Created), ReadyToUse: s.ready(), GroupSnapshotId: s.Group}
}

// cutOptions is what a class's parameters ask of a cut, for a VolumeSnapshotClass and a
// VolumeGroupSnapshotClass alike.
type cutOptions struct {
	failWith         string        // failWith: the cut fails with this message
	takes            time.Duration // cutSeconds: the cut takes this much longer
	reflink          bool          // cut=reflink
	ignoreFailedRead bool
	neverReady       bool
	upload           *time.Duration // uploadSeconds: ready this long after the cut (nil: at once)
}

func parseCutOptions(p map[string]string) (cutOptions, error) {
	o := cutOptions{
		failWith:         p["failWith"],
		reflink:          strings.EqualFold(p["cut"], "reflink"),
		ignoreFailedRead: strings.EqualFold(p["ignoreFailedRead"], "true"),
		neverReady:       strings.EqualFold(p["neverReady"], "true"),
	}
	if cut := p["cutSeconds"]; cut != "" {
		var err error
		if o.takes, err = time.ParseDuration(cut + "s"); err != nil {
			return o, status.Errorf(codes.InvalidArgument, "cutSeconds %q: %v", cut, err)
		}
	}
	if upload := p["uploadSeconds"]; upload != "" {
		seconds, err := time.ParseDuration(upload + "s")
		if err != nil {
			return o, status.Errorf(codes.InvalidArgument, "uploadSeconds %q: %v", upload, err)
		}
		o.upload = &seconds
	}
	return o, nil
}

// cutSource is the directory a cut of v copies: the volume's directory, or for cut=reflink the
// real directory on the reflink file system (refused for a volume elsewhere). mu held.
func (d *driver) cutSource(v *volume, o cutOptions) (string, error) {
	if !o.reflink {
		return v.Path, nil
	}
	real, err := os.Readlink(v.Path)
	if err != nil || filepath.Dir(real) != d.reflinkDir {
		return "", status.Errorf(codes.InvalidArgument, "cut=reflink needs a volume of a StorageClass with reflink=true; %s is not one", v.ID)
	}
	return real, nil
}

// newCut records a snapshot of v named name, not cut yet, as a member of group ("" for none).
// mu held; the caller saves.
func (d *driver) newCut(name string, v *volume, group string, o cutOptions) *snapshot {
	s := &snapshot{ID: newID(), Name: name, VolumeID: v.ID, Group: group, Size: v.Size, Created: time.Now().UTC()}
	s.Path = filepath.Join(d.dir, s.ID+".snap")
	if o.reflink {
		s.Path = filepath.Join(d.reflinkDir, s.ID+".snap.d")
	}
	d.st.Snapshots[s.ID] = s
	return s
}

// cut copies source (v's files) into s, which newCut recorded, and records the outcome: a
// failed copy is removed, a whole one is Cut, and ready as o says. The copy runs without mu
// and without the caller's context: it must finish even when the sidecar's call times out, so
// that a retry finds it.
func (d *driver) cut(s *snapshot, v *volume, source string, o cutOptions) error {
	time.Sleep(o.takes)
	var out []byte
	var err error
	if o.reflink {
		// Files are cloned one by one: as fuzzy across files as tar.
		out, err = exec.Command("cp", "-a", "--reflink=always", source+"/.", s.Path).CombinedOutput()
	} else {
		args := []string{"-c", "-z", "-f", s.Path}
		if o.ignoreFailedRead {
			args = append(args, "--ignore-failed-read")
		}
		args = append(args, "-C", source, ".")
		out, err = exec.Command("tar", args...).CombinedOutput()
		var ee *exec.ExitError
		// GNU tar exits 1 when a file changed while it was read: that is the fuzzy copy we model.
		if errors.As(err, &ee) && ee.ExitCode() == 1 {
			log.Printf("cut %s: files changed while read: %s", s.Name, strings.TrimSpace(string(out)))
			err = nil
		}
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil {
		os.RemoveAll(s.Path)
		delete(d.st.Snapshots, s.ID)
		d.save()
		return status.Errorf(codes.Internal, "copying volume %s failed: %v: %s", v.ID, err, out)
	}
	s.Cut = true
	switch {
	case o.neverReady:
	case o.upload != nil:
		at := time.Now().Add(*o.upload)
		s.ReadyAt = &at
	default:
		s.Ready = true
	}
	log.Printf("cut %s -> %s of %s (cut at %s, took %s)", s.Name, s.Path, v.ID, s.Created.Format(time.RFC3339Nano), time.Since(s.Created))
	if err := d.save(); err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	return nil
}

func (d *driver) CreateSnapshot(_ context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if req.GetName() == "" || req.GetSourceVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "name and source volume id are required")
	}
	o, err := parseCutOptions(req.GetParameters())
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	for _, s := range d.st.Snapshots {
		if s.Name == req.GetName() {
			d.mu.Unlock()
			if s.VolumeID != req.GetSourceVolumeId() {
				return nil, status.Errorf(codes.AlreadyExists, "snapshot %s exists for another volume", s.Name)
			}
			if !s.Cut {
				// Still being written by an earlier call that timed out. No answer with a
				// creationTime before the copy is whole: the caller takes creationTime as "cut"
				// and may end PostgreSQL's backup mode then.
				return nil, status.Errorf(codes.Aborted, "snapshot %s is still being written", s.Name)
			}
			return &csi.CreateSnapshotResponse{Snapshot: s.csi()}, nil
		}
	}
	v, ok := d.st.Volumes[req.GetSourceVolumeId()]
	if !ok {
		d.mu.Unlock()
		return nil, status.Errorf(codes.NotFound, "volume %s not found", req.GetSourceVolumeId())
	}
	if o.failWith != "" {
		d.mu.Unlock()
		return nil, status.Error(codes.Internal, o.failWith)
	}
	source, err := d.cutSource(v, o)
	if err != nil {
		d.mu.Unlock()
		return nil, err
	}
	s := d.newCut(req.GetName(), v, "", o)
	d.save()
	d.mu.Unlock()

	if err := d.cut(s, v, source, o); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return &csi.CreateSnapshotResponse{Snapshot: s.csi()}, nil
}

func (d *driver) DeleteSnapshot(_ context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	if req.GetSnapshotId() == "" {
		return nil, status.Error(codes.InvalidArgument, "snapshot id missing")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	s, ok := d.st.Snapshots[req.GetSnapshotId()]
	if !ok {
		// Deleted before (a retry), or a member gone with its group. (external-snapshotter
		// deletes a group's members only through DeleteVolumeGroupSnapshot, but may ask anyway.)
		log.Printf("DeleteSnapshot %s: already gone", req.GetSnapshotId())
		return &csi.DeleteSnapshotResponse{}, nil
	}
	if !s.Cut {
		return nil, status.Errorf(codes.FailedPrecondition, "snapshot %s is still being written", s.ID)
	}
	if err := os.RemoveAll(s.Path); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	delete(d.st.Snapshots, s.ID)
	log.Printf("DeleteSnapshot %s (%s)", s.ID, s.Name)
	return &csi.DeleteSnapshotResponse{}, d.save()
}

func (d *driver) ListSnapshots(_ context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []*csi.ListSnapshotsResponse_Entry
	for _, s := range d.st.Snapshots {
		if req.GetSnapshotId() != "" && s.ID != req.GetSnapshotId() {
			continue
		}
		if req.GetSourceVolumeId() != "" && s.VolumeID != req.GetSourceVolumeId() {
			continue
		}
		out = append(out, &csi.ListSnapshotsResponse_Entry{Snapshot: s.csi()})
	}
	return &csi.ListSnapshotsResponse{Entries: out}, nil
}

// ---- group controller

func (d *driver) GroupControllerGetCapabilities(context.Context, *csi.GroupControllerGetCapabilitiesRequest) (*csi.GroupControllerGetCapabilitiesResponse, error) {
	return &csi.GroupControllerGetCapabilitiesResponse{Capabilities: []*csi.GroupControllerServiceCapability{
		{Type: &csi.GroupControllerServiceCapability_Rpc{Rpc: &csi.GroupControllerServiceCapability_RPC{
			Type: csi.GroupControllerServiceCapability_RPC_CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT}}},
	}}, nil
}

// csi is the group as CSI reports it, mu held: its members that still exist, ready when every
// member exists and is ready.
func (g *group) csi(st *state) *csi.VolumeGroupSnapshot {
	out := &csi.VolumeGroupSnapshot{GroupSnapshotId: g.ID, CreationTime: timestamppb.New(g.Created), ReadyToUse: true}
	for _, id := range g.Snapshots {
		s, ok := st.Snapshots[id]
		if !ok {
			out.ReadyToUse = false
			continue
		}
		m := s.csi()
		out.Snapshots = append(out.Snapshots, m)
		out.ReadyToUse = out.ReadyToUse && m.ReadyToUse
	}
	return out
}

// sameSet says whether a and b hold the same strings, in any order.
func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	n := map[string]int{}
	for _, x := range a {
		n[x]++
	}
	for _, x := range b {
		if n[x]--; n[x] < 0 {
			return false
		}
	}
	return true
}

// checkMembers refuses snapshot ids the caller names that are not the group's (CSI asks a
// plugin that can tell to say so).
func (g *group) checkMembers(ids []string) error {
	for _, id := range ids {
		found := false
		for _, m := range g.Snapshots {
			found = found || m == id
		}
		if !found {
			return status.Errorf(codes.InvalidArgument, "snapshot %s is not a member of group snapshot %s", id, g.ID)
		}
	}
	return nil
}

// CreateVolumeGroupSnapshot cuts one snapshot per source volume with CreateSnapshot's cut and
// the class's parameters, all at once, and answers when every member is cut. Not atomic across
// volumes: each member is as fuzzy as one tar, and the members start within moments of one
// another rather than at one instant.
func (d *driver) CreateVolumeGroupSnapshot(_ context.Context, req *csi.CreateVolumeGroupSnapshotRequest) (*csi.CreateVolumeGroupSnapshotResponse, error) {
	ids := req.GetSourceVolumeIds()
	if req.GetName() == "" || len(ids) == 0 {
		return nil, status.Error(codes.InvalidArgument, "name and source volume ids are required")
	}
	for i, id := range ids {
		for _, other := range ids[:i] {
			if id == other {
				return nil, status.Errorf(codes.InvalidArgument, "volume %s named twice", id)
			}
		}
	}
	o, err := parseCutOptions(req.GetParameters())
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	for _, g := range d.st.Groups {
		if g.Name == req.GetName() {
			defer d.mu.Unlock()
			if !sameSet(g.VolumeIDs, ids) {
				return nil, status.Errorf(codes.AlreadyExists, "group snapshot %s exists for other volumes", g.Name)
			}
			if !g.Cut {
				// As CreateSnapshot: no creationTime before every member is whole.
				return nil, status.Errorf(codes.Aborted, "group snapshot %s is still being cut", g.Name)
			}
			return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: g.csi(&d.st)}, nil
		}
	}
	vols := make([]*volume, len(ids))
	sources := make([]string, len(ids))
	for i, id := range ids {
		v, ok := d.st.Volumes[id]
		if !ok {
			d.mu.Unlock()
			return nil, status.Errorf(codes.NotFound, "volume %s not found", id)
		}
		if sources[i], err = d.cutSource(v, o); err != nil {
			d.mu.Unlock()
			return nil, err
		}
		vols[i] = v
	}
	if o.failWith != "" {
		d.mu.Unlock()
		return nil, status.Error(codes.Internal, o.failWith)
	}
	g := &group{ID: newID(), Name: req.GetName(), VolumeIDs: ids, Created: time.Now().UTC()}
	members := make([]*snapshot, len(ids))
	for i, v := range vols {
		// Member names cannot meet a CreateSnapshot name: Kubernetes names hold no "/".
		members[i] = d.newCut(g.Name+"/"+v.ID, v, g.ID, o)
		// A member holds the group's instant, as on storage that cuts a group atomically.
		members[i].Created = g.Created
		g.Snapshots = append(g.Snapshots, members[i].ID)
	}
	d.st.Groups[g.ID] = g
	d.save()
	d.mu.Unlock()

	errs := make([]error, len(ids))
	var wg sync.WaitGroup
	for i := range members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = d.cut(members[i], vols[i], sources[i], o)
		}()
	}
	wg.Wait()

	d.mu.Lock()
	defer d.mu.Unlock()
	if err := errors.Join(errs...); err != nil {
		// One member failed: the group fails whole, and the members that were cut go.
		for _, s := range members {
			if _, ok := d.st.Snapshots[s.ID]; ok {
				os.RemoveAll(s.Path)
				delete(d.st.Snapshots, s.ID)
			}
		}
		delete(d.st.Groups, g.ID)
		d.save()
		return nil, status.Errorf(codes.Internal, "group snapshot %s: %v", g.Name, err)
	}
	g.Cut = true
	log.Printf("CreateVolumeGroupSnapshot %s -> %s: %d members (%s), took %s", g.Name, g.ID, len(members), strings.Join(g.Snapshots, ", "), time.Since(g.Created))
	if err := d.save(); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: g.csi(&d.st)}, nil
}

// DeleteVolumeGroupSnapshot deletes the members (those already deleted on their own are fine)
// and the group.
func (d *driver) DeleteVolumeGroupSnapshot(_ context.Context, req *csi.DeleteVolumeGroupSnapshotRequest) (*csi.DeleteVolumeGroupSnapshotResponse, error) {
	if req.GetGroupSnapshotId() == "" {
		return nil, status.Error(codes.InvalidArgument, "group snapshot id missing")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	g, ok := d.st.Groups[req.GetGroupSnapshotId()]
	if !ok {
		return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
	}
	if !g.Cut {
		return nil, status.Errorf(codes.FailedPrecondition, "group snapshot %s is still being cut", g.ID)
	}
	if err := g.checkMembers(req.GetSnapshotIds()); err != nil {
		return nil, err
	}
	for _, id := range g.Snapshots {
		s, ok := d.st.Snapshots[id]
		if !ok {
			continue
		}
		if err := os.RemoveAll(s.Path); err != nil {
			d.save()
			return nil, status.Error(codes.Internal, err.Error())
		}
		delete(d.st.Snapshots, id)
	}
	delete(d.st.Groups, g.ID)
	log.Printf("DeleteVolumeGroupSnapshot %s (%s)", g.ID, g.Name)
	return &csi.DeleteVolumeGroupSnapshotResponse{}, d.save()
}

func (d *driver) GetVolumeGroupSnapshot(_ context.Context, req *csi.GetVolumeGroupSnapshotRequest) (*csi.GetVolumeGroupSnapshotResponse, error) {
	if req.GetGroupSnapshotId() == "" {
		return nil, status.Error(codes.InvalidArgument, "group snapshot id missing")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	g, ok := d.st.Groups[req.GetGroupSnapshotId()]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "group snapshot %s not found", req.GetGroupSnapshotId())
	}
	if !g.Cut {
		return nil, status.Errorf(codes.Aborted, "group snapshot %s is still being cut", g.ID)
	}
	if err := g.checkMembers(req.GetSnapshotIds()); err != nil {
		return nil, err
	}
	return &csi.GetVolumeGroupSnapshotResponse{GroupSnapshot: g.csi(&d.st)}, nil
}

// ---- node: only what a caller could ask of a plugin that has no node service in use.

func (d *driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.nodeID}, nil
}

func (d *driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

var version = "dev"

func main() {
	d := &driver{version: version}
	endpoint := flag.String("endpoint", "unix:///csi/csi.sock", "CSI endpoint")
	flag.StringVar(&d.name, "drivername", "hostpath.csi.k8s.io", "CSI driver name")
	flag.StringVar(&d.nodeID, "nodeid", "", "node id")
	flag.StringVar(&d.dir, "statedir", "/csi-data-dir", "directory for volumes, snapshots and state.json")
	flag.StringVar(&d.reflinkDir, "reflink-dir", "", "an XFS file system with reflink, for reflink volumes and snapshots (none: refused)")
	flag.Bool("enable-topology", false, "accepted for compatibility with the upstream driver; topology is never reported")
	flag.Int("v", 0, "accepted for compatibility; ignored")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds | log.LUTC)

	if err := os.MkdirAll(d.dir, 0o755); err != nil {
		log.Fatal(err)
	}
	if err := d.load(); err != nil {
		log.Fatal(err)
	}
	sock := strings.TrimPrefix(*endpoint, "unix://")
	os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		resp, err := h(ctx, req)
		if err != nil {
			log.Printf("%s: %v", info.FullMethod, err)
		}
		return resp, err
	}))
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterControllerServer(srv, d)
	csi.RegisterNodeServer(srv, d)
	csi.RegisterGroupControllerServer(srv, d)
	go func() {
		c := make(chan os.Signal, 1)
		signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
		<-c
		srv.Stop()
	}()
	log.Printf("%s %s serving on %s, state in %s", d.name, d.version, sock, d.dir)
	if err := srv.Serve(l); err != nil {
		log.Fatal(err)
	}
}
