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
// Only the identity and controller services are served: the node agent bind-mounts volume
// directories itself, so no NodePublish is needed.
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

type state struct {
	Volumes   map[string]*volume   `json:"volumes"`
	Snapshots map[string]*snapshot `json:"snapshots"`
}

type driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer

	name, version, nodeID, dir string
	// An XFS file system with reflink, for reflink volumes and their snapshots; "" if none.
	reflinkDir string

	mu sync.Mutex
	st state
}

func (d *driver) statePath() string { return filepath.Join(d.dir, "state.json") }

func (d *driver) load() error {
	d.st = state{Volumes: map[string]*volume{}, Snapshots: map[string]*snapshot{}}
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
		CreationTime: timestamppb.New(s.Created), ReadyToUse: s.ready()}
}

func (d *driver) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if req.GetName() == "" || req.GetSourceVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "name and source volume id are required")
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
	if msg := req.GetParameters()["failWith"]; msg != "" {
		d.mu.Unlock()
		return nil, status.Error(codes.Internal, msg)
	}
	var cutTakes time.Duration
	if cut := req.GetParameters()["cutSeconds"]; cut != "" {
		var err error
		if cutTakes, err = time.ParseDuration(cut + "s"); err != nil {
			d.mu.Unlock()
			return nil, status.Errorf(codes.InvalidArgument, "cutSeconds %q: %v", cut, err)
		}
	}
	reflink := strings.EqualFold(req.GetParameters()["cut"], "reflink")
	var source string
	if reflink {
		real, err := os.Readlink(v.Path)
		if err != nil || filepath.Dir(real) != d.reflinkDir {
			d.mu.Unlock()
			return nil, status.Errorf(codes.InvalidArgument, "cut=reflink needs a volume of a StorageClass with reflink=true; %s is not one", v.ID)
		}
		source = real
	}
	s := &snapshot{ID: newID(), Name: req.GetName(), VolumeID: v.ID, Size: v.Size, Created: time.Now().UTC()}
	s.Path = filepath.Join(d.dir, s.ID+".snap")
	if reflink {
		s.Path = filepath.Join(d.reflinkDir, s.ID+".snap.d")
	}
	d.st.Snapshots[s.ID] = s
	d.save()
	d.mu.Unlock()

	time.Sleep(cutTakes)
	var out []byte
	var err error
	if reflink {
		// Not ctx, like tar below. Files are cloned one by one: as fuzzy across files as tar.
		out, err = exec.Command("cp", "-a", "--reflink=always", source+"/.", s.Path).CombinedOutput()
	} else {
		args := []string{"-c", "-z", "-f", s.Path}
		if strings.EqualFold(req.GetParameters()["ignoreFailedRead"], "true") {
			args = append(args, "--ignore-failed-read")
		}
		args = append(args, "-C", v.Path, ".")
		// Not ctx: the tar must finish even when the sidecar's call times out, so a retry finds it.
		out, err = exec.Command("tar", args...).CombinedOutput()
		var ee *exec.ExitError
		// GNU tar exits 1 when a file changed while it was read: that is the fuzzy copy we model.
		if errors.As(err, &ee) && ee.ExitCode() == 1 {
			log.Printf("CreateSnapshot %s: files changed while read: %s", s.Name, strings.TrimSpace(string(out)))
			err = nil
		}
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil {
		os.RemoveAll(s.Path)
		delete(d.st.Snapshots, s.ID)
		d.save()
		return nil, status.Errorf(codes.Internal, "copying volume %s failed: %v: %s", v.ID, err, out)
	}
	s.Cut = true
	switch upload := req.GetParameters()["uploadSeconds"]; {
	case strings.EqualFold(req.GetParameters()["neverReady"], "true"):
	case upload != "":
		seconds, err := time.ParseDuration(upload + "s")
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "uploadSeconds %q: %v", upload, err)
		}
		at := time.Now().Add(seconds)
		s.ReadyAt = &at
	default:
		s.Ready = true
	}
	log.Printf("CreateSnapshot %s -> %s of %s (cut at %s, took %s)", s.Name, s.Path, v.ID, s.Created.Format(time.RFC3339Nano), time.Since(s.Created))
	return &csi.CreateSnapshotResponse{Snapshot: s.csi()}, d.save()
}

func (d *driver) DeleteSnapshot(_ context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	if req.GetSnapshotId() == "" {
		return nil, status.Error(codes.InvalidArgument, "snapshot id missing")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	s, ok := d.st.Snapshots[req.GetSnapshotId()]
	if !ok {
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
