package deploytest

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/ars-dev/ars/internal/testutil"
)

// The DaemonSet, modelled on the Kubernetes API fields the manifest uses
// (k8s.io/api is not a dependency): decoded with KnownFields, so a
// misspelt or misplaced field fails here as it would with `kubectl
// apply --validate=strict`. Fields of the API not modelled fail too: add
// them here when the manifest starts using them.
type (
	objectMeta struct {
		Name        string            `yaml:"name"`
		Namespace   string            `yaml:"namespace"`
		Labels      map[string]string `yaml:"labels"`
		Annotations map[string]string `yaml:"annotations"`
	}
	probe struct {
		HTTPGet struct {
			Path string `yaml:"path"`
			Port any    `yaml:"port"`
		} `yaml:"httpGet"`
		InitialDelaySeconds int `yaml:"initialDelaySeconds"`
		PeriodSeconds       int `yaml:"periodSeconds"`
		FailureThreshold    int `yaml:"failureThreshold"`
	}
	container struct {
		Name            string   `yaml:"name"`
		Image           string   `yaml:"image"`
		ImagePullPolicy string   `yaml:"imagePullPolicy"`
		Command         []string `yaml:"command"`
		Args            []string `yaml:"args"`
		Ports           []struct {
			Name          string `yaml:"name"`
			ContainerPort int    `yaml:"containerPort"`
			Protocol      string `yaml:"protocol"`
		} `yaml:"ports"`
		LivenessProbe  *probe `yaml:"livenessProbe"`
		ReadinessProbe *probe `yaml:"readinessProbe"`
		Resources      struct {
			Requests map[string]string `yaml:"requests"`
			Limits   map[string]string `yaml:"limits"`
		} `yaml:"resources"`
		SecurityContext struct {
			Privileged               *bool `yaml:"privileged"`
			AllowPrivilegeEscalation *bool `yaml:"allowPrivilegeEscalation"`
			ReadOnlyRootFilesystem   bool  `yaml:"readOnlyRootFilesystem"`
			RunAsUser                *int  `yaml:"runAsUser"`
			Capabilities             struct {
				Drop []string `yaml:"drop"`
				Add  []string `yaml:"add"`
			} `yaml:"capabilities"`
			SeccompProfile  struct{ Type string } `yaml:"seccompProfile"`
			AppArmorProfile struct{ Type string } `yaml:"appArmorProfile"`
		} `yaml:"securityContext"`
		VolumeMounts []struct {
			Name             string `yaml:"name"`
			MountPath        string `yaml:"mountPath"`
			ReadOnly         bool   `yaml:"readOnly"`
			MountPropagation string `yaml:"mountPropagation"`
		} `yaml:"volumeMounts"`
	}
	daemonSet struct {
		APIVersion string     `yaml:"apiVersion"`
		Kind       string     `yaml:"kind"`
		Metadata   objectMeta `yaml:"metadata"`
		Spec       struct {
			Selector struct {
				MatchLabels map[string]string `yaml:"matchLabels"`
			} `yaml:"selector"`
			UpdateStrategy struct {
				Type          string `yaml:"type"`
				RollingUpdate struct {
					MaxUnavailable any `yaml:"maxUnavailable"`
				} `yaml:"rollingUpdate"`
			} `yaml:"updateStrategy"`
			Template struct {
				Metadata objectMeta `yaml:"metadata"`
				Spec     struct {
					ServiceAccountName            string                      `yaml:"serviceAccountName"`
					HostPID                       bool                        `yaml:"hostPID"`
					HostNetwork                   bool                        `yaml:"hostNetwork"`
					DNSPolicy                     string                      `yaml:"dnsPolicy"`
					NodeSelector                  map[string]string           `yaml:"nodeSelector"`
					Tolerations                   []struct{ Operator string } `yaml:"tolerations"`
					PriorityClassName             string                      `yaml:"priorityClassName"`
					TerminationGracePeriodSeconds int                         `yaml:"terminationGracePeriodSeconds"`
					Containers                    []container                 `yaml:"containers"`
					Volumes                       []struct {
						Name     string `yaml:"name"`
						HostPath *struct {
							Path string `yaml:"path"`
							Type string `yaml:"type"`
						} `yaml:"hostPath"`
						ConfigMap *struct {
							Name string `yaml:"name"`
						} `yaml:"configMap"`
					} `yaml:"volumes"`
				} `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
)

func docsOf(t *testing.T, path string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	dec := yaml.NewDecoder(bytes.NewReader(b))
	for {
		var n yaml.Node
		err := dec.Decode(&n)
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatalf("%s: document %d: %v", path, len(out)+1, err)
		}
		doc, err := yaml.Marshal(&n)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, doc)
	}
}

func TestKubernetesManifests(t *testing.T) {
	files, _ := filepath.Glob(deployDir(t, "kubernetes", "*.yaml"))
	if len(files) == 0 {
		t.Fatal("no deploy/kubernetes/*.yaml")
	}
	kinds := map[string]int{}
	var ds *daemonSet
	for _, f := range files {
		for i, raw := range docsOf(t, f) {
			var m map[string]any
			if err := yaml.Unmarshal(raw, &m); err != nil {
				t.Fatal(err)
			}
			kind, _ := m["kind"].(string)
			api, _ := m["apiVersion"].(string)
			name, _ := get(m, "metadata", "name").(string)
			if kind == "" || api == "" || name == "" {
				t.Errorf("%s doc %d: apiVersion, kind and metadata.name are required", filepath.Base(f), i+1)
			}
			want := map[string]string{"Namespace": "v1", "ServiceAccount": "v1", "ConfigMap": "v1",
				"Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
				"DaemonSet": "apps/v1"}[kind]
			if want == "" || want != api {
				t.Errorf("%s doc %d: unexpected %s %s", filepath.Base(f), i+1, api, kind)
			}
			if kind != "Namespace" && get(m, "metadata", "namespace") != "ars-system" {
				t.Errorf("%s %s: not in namespace ars-system", kind, name)
			}
			kinds[kind]++
			if kind == "DaemonSet" {
				ds = new(daemonSet)
				dec := yaml.NewDecoder(bytes.NewReader(raw))
				dec.KnownFields(true)
				if err := dec.Decode(ds); err != nil {
					t.Fatalf("DaemonSet: %v", err)
				}
			}
			if kind == "Role" {
				rules, _ := m["rules"].([]any)
				ok := false
				for _, r := range rules {
					if strings.Contains(strings.ToLower(strings.TrimSpace(yamlString(r))), "coordination.k8s.io") &&
						strings.Contains(yamlString(r), "leases") {
						ok = true
					}
				}
				if !ok {
					t.Error("Role does not grant coordination.k8s.io leases")
				}
			}
		}
	}
	for _, k := range []string{"DaemonSet", "ServiceAccount", "Role", "RoleBinding"} {
		if kinds[k] != 1 {
			t.Errorf("%d %s objects, want 1", kinds[k], k)
		}
	}
	if ds == nil {
		t.FailNow()
	}
	s := ds.Spec.Template.Spec
	for k, v := range ds.Spec.Selector.MatchLabels {
		if ds.Spec.Template.Metadata.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the pod template's labels", k, v)
		}
	}
	if !s.HostPID || s.ServiceAccountName != "arsd" || len(s.Containers) != 1 {
		t.Errorf("pod spec: hostPID=%v serviceAccountName=%q containers=%d", s.HostPID, s.ServiceAccountName, len(s.Containers))
	}
	a := ds.Spec.Template.Metadata.Annotations
	if a["prometheus.io/scrape"] != "true" || a["prometheus.io/port"] != "9464" {
		t.Errorf("scrape annotations: %v", a)
	}
	c := s.Containers[0]
	for _, p := range []*probe{c.LivenessProbe, c.ReadinessProbe} {
		if p == nil || p.HTTPGet.Path != "/healthz" {
			t.Errorf("container needs liveness and readiness probes on /healthz")
		}
	}
	if c.Resources.Requests["cpu"] == "" || c.Resources.Requests["memory"] == "" || c.Resources.Limits["memory"] == "" {
		t.Errorf("resources: %+v", c.Resources)
	}
	sc := c.SecurityContext
	if sc.Privileged == nil || *sc.Privileged || len(sc.Capabilities.Add) == 0 || strings.Join(sc.Capabilities.Drop, ",") != "ALL" {
		t.Errorf("securityContext: want privileged: false, drop ALL, explicit adds: %+v", sc)
	}
	vols := map[string]string{}
	for _, v := range s.Volumes {
		if v.HostPath != nil {
			vols[v.Name] = v.HostPath.Path
		}
	}
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		if _, ok := vols[m.Name]; !ok && m.Name != "config" {
			t.Errorf("mount %s has no volume", m.Name)
		}
		mounts[vols[m.Name]] = m.MountPath
	}
	for _, p := range []string{"/sys/fs/cgroup", "/sys/fs/bpf", "/sys/kernel/btf", "/run/ars", "/var/lib/ars"} {
		if mounts[p] != p {
			t.Errorf("host path %s is not mounted at the same path (mounts: %v)", p, mounts)
		}
	}
}

func yamlString(v any) string {
	b, _ := yaml.Marshal(v)
	return string(b)
}

const unitPath = "systemd/arsd.service"

// TestSystemdUnitVerifies runs systemd-analyze verify on the unit with
// ExecStart pointed at a real arsd; any warning fails the test.
func TestSystemdUnitVerifies(t *testing.T) {
	sa := testutil.RequireCommand(t, "systemd-analyze")
	b, err := os.ReadFile(deployDir(t, unitPath))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "arsd")
	build := exec.Command("go", "build", "-o", bin, "./cmd/arsd")
	build.Dir = testutil.RepoRoot(t)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	unit := filepath.Join(dir, "arsd.service")
	if err := os.WriteFile(unit, bytes.ReplaceAll(b, []byte("/usr/local/bin/arsd"), []byte(bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(sa, "verify", "--man=no", unit)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestSystemdUnitHardening: the directives the unit must keep.
func TestSystemdUnitHardening(t *testing.T) {
	b, err := os.ReadFile(deployDir(t, unitPath))
	if err != nil {
		t.Fatal(err)
	}
	kv := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok && !strings.HasPrefix(l, "#") {
			kv[k] = v
		}
	}
	for k, v := range map[string]string{
		"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
		"ReadWritePaths": "/sys/fs/cgroup /run/ars /var/lib/ars", "ExecStart": "/usr/local/bin/arsd",
		"CapabilityBoundingSet": "CAP_BPF CAP_PERFMON CAP_SYS_ADMIN CAP_NET_ADMIN CAP_SYS_RESOURCE CAP_DAC_OVERRIDE",
	} {
		if kv[k] != v {
			t.Errorf("%s=%q, want %q", k, kv[k], v)
		}
	}
}

// TestMakeInstall installs into a temporary DESTDIR with PREFIX=/usr.
func TestMakeInstall(t *testing.T) {
	testutil.RequireCommand(t, "make")
	dir := t.TempDir()
	dest := filepath.Join(dir, "root")
	cmd := exec.Command("make", "--no-print-directory", "install", "DESTDIR="+dest, "PREFIX=/usr", "BIN="+filepath.Join(dir, "bin"))
	cmd.Dir = testutil.RepoRoot(t)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	for _, f := range []string{"usr/bin/arsd", "usr/bin/arsctl", "etc/systemd/system/arsd.service",
		"usr/share/ars/prometheus/ars-alerts.yml", "usr/share/ars/grafana/ars-dashboard.json",
		"usr/share/ars/kubernetes/arsd.yaml", "usr/share/doc/ars/README.md"} {
		st, err := os.Stat(filepath.Join(dest, f))
		if err != nil {
			t.Error(err)
			continue
		}
		if strings.HasPrefix(f, "usr/bin/") && st.Mode().Perm() != 0o755 {
			t.Errorf("%s mode %v", f, st.Mode())
		}
	}
	unit, err := os.ReadFile(filepath.Join(dest, "etc/systemd/system/arsd.service"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(unit, []byte("ExecStart=/usr/bin/arsd\n")) || bytes.Contains(unit, []byte("/usr/local/bin")) {
		t.Errorf("installed unit does not follow PREFIX=/usr:\n%s", unit)
	}
	if out, err := exec.Command(filepath.Join(dest, "usr/bin/arsd"), "--print-config").CombinedOutput(); err != nil {
		t.Errorf("installed arsd --print-config: %v\n%s", err, out)
	}
}
