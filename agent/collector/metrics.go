package collector

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
)

var collectorUpDesc = prometheus.NewDesc("ars_collector_up",
	"1 when the privilege-separated telemetry collector process is running and answered this scrape.", nil, nil)

var collectorRestartsDesc = prometheus.NewDesc("ars_collector_restarts_total",
	"Times the engine restarted a dead telemetry collector process.", nil, nil)

// Describe implements prometheus.Collector. The telemetry metrics come
// from the collector process and are not known in advance: the Client is
// an unchecked collector apart from its own two metrics.
func (c *Client) Describe(ch chan<- *prometheus.Desc) {
	ch <- collectorUpDesc
	ch <- collectorRestartsDesc
}

// Collect implements prometheus.Collector: it asks the collector for its
// telemetry metrics and re-emits them.
func (c *Client) Collect(ch chan<- prometheus.Metric) {
	mfs, err := c.gather()
	up := 1.0
	if err != nil {
		up = 0
		c.log.Warn("collector metrics", "err", err)
	}
	ch <- prometheus.MustNewConstMetric(collectorUpDesc, prometheus.GaugeValue, up)
	ch <- prometheus.MustNewConstMetric(collectorRestartsDesc, prometheus.CounterValue, float64(c.Restarts()))
	for _, mf := range mfs {
		for _, m := range familyMetrics(mf) {
			ch <- m
		}
	}
}

func (c *Client) gather() ([]*dto.MetricFamily, error) {
	c.mu.Lock()
	in := c.inc
	if in == nil {
		err := c.errDownLocked()
		c.mu.Unlock()
		return nil, err
	}
	var rep reply
	err := c.callLocked(in, request{Op: opMetrics}, &rep)
	c.mu.Unlock()
	if err != nil {
		return nil, err
	}
	dec := expfmt.NewDecoder(bytes.NewReader(rep.Data), expfmt.NewFormat(expfmt.TypeProtoDelim))
	var out []*dto.MetricFamily
	for {
		mf := &dto.MetricFamily{}
		if err := dec.Decode(mf); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return out, fmt.Errorf("decode collector metrics: %w", err)
		}
		out = append(out, mf)
	}
}

// familyMetrics turns a gathered family back into const metrics
// (counters, gauges, untyped and histograms; summaries are not used by
// the telemetry and are skipped).
func familyMetrics(mf *dto.MetricFamily) []prometheus.Metric {
	var out []prometheus.Metric
	for _, m := range mf.GetMetric() {
		var names, values []string
		for _, lp := range m.GetLabel() {
			names = append(names, lp.GetName())
			values = append(values, lp.GetValue())
		}
		desc := prometheus.NewDesc(mf.GetName(), mf.GetHelp(), names, nil)
		var pm prometheus.Metric
		var err error
		switch mf.GetType() {
		case dto.MetricType_COUNTER:
			pm, err = prometheus.NewConstMetric(desc, prometheus.CounterValue, m.GetCounter().GetValue(), values...)
		case dto.MetricType_GAUGE:
			pm, err = prometheus.NewConstMetric(desc, prometheus.GaugeValue, m.GetGauge().GetValue(), values...)
		case dto.MetricType_UNTYPED:
			pm, err = prometheus.NewConstMetric(desc, prometheus.UntypedValue, m.GetUntyped().GetValue(), values...)
		case dto.MetricType_HISTOGRAM:
			h := m.GetHistogram()
			buckets := make(map[float64]uint64, len(h.GetBucket()))
			for _, b := range h.GetBucket() {
				buckets[b.GetUpperBound()] = b.GetCumulativeCount()
			}
			pm, err = prometheus.NewConstHistogram(desc, h.GetSampleCount(), h.GetSampleSum(), buckets, values...)
		default:
			continue
		}
		if err == nil {
			out = append(out, pm)
		}
	}
	return out
}
