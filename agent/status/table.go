package status

import (
	"fmt"
	"io"
	"text/tabwriter"
)

// WriteTable prints the per-VM table operators read (CPU in cores, delays
// in ms); arsctl and the demo both use it.
func WriteTable(out io.Writer, vms []VM) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "VM\tPID\tVCPUS\tUSAGE\tDEMAND\tFORECAST\tALLOC\tFLOOR\tCEIL\tRUNQ-MEAN\tRUNQ-P99\t")
	for _, v := range vms {
		mean, p99 := "-", "-"
		if v.RunqValid {
			mean, p99 = fmt.Sprintf("%.2fms", v.RunqMeanNs/1e6), fmt.Sprintf("%.2fms", v.RunqP99Ns/1e6)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%s\t%s\t\n", v.Name, v.PID, v.VCPUs,
			v.UsageMillicores/1000, v.DemandMillicores/1000, v.ForecastMillicores/1000,
			float64(v.AllocMillicores)/1000, float64(v.FloorMillicores)/1000, float64(v.CeilingMillicores)/1000, mean, p99)
	}
	return tw.Flush()
}
