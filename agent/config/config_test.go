package config

import (
	"strings"
	"testing"
	"time"
)

func TestDefaultsValid(t *testing.T) {
	if err := Default().Validate(); err != nil {
		t.Fatal(err)
	}
	c, err := Parse(strings.NewReader(""))
	if err != nil {
		t.Fatalf("empty file: %v", err)
	}
	if c.QMPDir != "/run/ars/qmp" || c.MetricsAddr != ":9464" || c.Tick != time.Second {
		t.Fatalf("defaults not applied: %+v", c)
	}
}

func TestParseOverrides(t *testing.T) {
	c, err := Parse(strings.NewReader(`
tick: 500ms
dryRun: true
predictor: {alpha: 0.3, margin: 0.1}
vms:
  web:
    cpu: {ceilingMillicores: 800}
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Tick != 500*time.Millisecond || !c.DryRun || c.Predictor.Alpha != 0.3 {
		t.Fatalf("overrides lost: %+v", c)
	}
	web := c.SLAFor("web")
	if web.CPU.CeilingMillicores != 800 || web.CPU.FloorMillicores != Default().DefaultSLA.CPU.FloorMillicores {
		t.Fatalf("web SLA %+v: ceiling not set or floor not inherited", web)
	}
	if c.SLAFor("other") != c.DefaultSLA {
		t.Fatal("unlisted VM does not get the default SLA")
	}
}

func TestParseErrorsNameTheField(t *testing.T) {
	cases := map[string]string{
		"tick: 1s\nbogus: 3\n":    "bogus",
		"predictor: {alpha: 2}\n": "alpha",
		"vms: {web: {cpu: {floorMillicores: 900, ceilingMillicores: 100}}}\n": "vms.web",
		"vms: {web: {cpu: {floorMilicores: 9}}}\n":                            "floorMilicores",
		"tick: fast\n":             "line 1",
		"qmpDir: relative/dir\n":   "qmpDir",
		"vms: {'bad name!': {}}\n": "bad VM name",
		"tick: 10ms\n":             "tick",
	}
	for in, want := range cases {
		_, err := Parse(strings.NewReader(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v, want error naming %q", in, err, want)
		}
	}
}

func TestParseTooLarge(t *testing.T) {
	big := strings.Repeat("#", 1<<20+10)
	if _, err := Parse(strings.NewReader(big)); err == nil {
		t.Fatal("accepted >1 MiB config")
	}
}

func FuzzParse(f *testing.F) {
	f.Add("tick: 1s\n")
	f.Add("vms: {a: {cpu: {floorMillicores: 100, ceilingMillicores: 200}}}\n")
	f.Add("predictor: {alpha: 0.5}\n")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := Parse(strings.NewReader(s))
		if err == nil {
			if verr := c.Validate(); verr != nil {
				t.Fatalf("Parse accepted a config Validate rejects: %v", verr)
			}
		}
	})
}
