// Package procs holds what the benchmark commands (bench, bench/soak) share:
// starting and stopping the processes they measure, reading those
// processes' memory and file descriptors from /proc, and scraping a
// sidecar's /metrics. Errors end the command: a benchmark that cannot set
// itself up has nothing to report.
package procs

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Check ends the command on err.
func Check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// Run runs a command to completion (a build), its output on stderr.
func Run(name string, args ...string) {
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	Check(cmd.Run())
}

// Stop sends SIGTERM and waits up to 10 s before killing.
func Stop(cmd *exec.Cmd) {
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
	}
}

// FreeAddr returns a loopback address whose port was free a moment ago.
func FreeAddr() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	Check(err)
	defer ln.Close()
	return ln.Addr().String()
}

// WaitHTTP waits up to 10 s for url to answer 200.
func WaitHTTP(url string) {
	for i := 0; i < 400; i++ {
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		time.Sleep(25 * time.Millisecond)
	}
	Check(fmt.Errorf("not ready: %s", url))
}

// StatusKB reads a kB field (VmRSS, VmHWM) of /proc/PID/status.
func StatusKB(pid int, field string) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	Check(err)
	for line := range strings.SplitSeq(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			kb, _ := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			return kb
		}
	}
	return 0
}

// CPU is the processor time (user and system, all threads) the process
// has used so far, from /proc/PID/stat (clock ticks of 10 ms).
func CPU(pid int) time.Duration {
	_, cpu, err := stat(pid)
	Check(err)
	return cpu
}

// TreeCPU is CPU of pid and of all its descendants alive now: what a
// server that forks its workers (NGINX's master and worker processes) has
// used. Descendants are found by their parent pid in /proc/*/stat; a
// process that vanishes while /proc is read is left out.
func TreeCPU(pid int) time.Duration {
	total := CPU(pid)
	ents, err := os.ReadDir("/proc")
	Check(err)
	children := map[int][]int{}
	cpus := map[int]time.Duration{}
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ppid, cpu, err := stat(p); err == nil {
			children[ppid] = append(children[ppid], p)
			cpus[p] = cpu
		}
	}
	for todo := children[pid]; len(todo) > 0; todo = todo[1:] {
		total += cpus[todo[0]]
		todo = append(todo, children[todo[0]]...)
	}
	return total
}

// stat reads a process's parent pid and processor time from /proc/PID/stat.
func stat(pid int) (ppid int, cpu time.Duration, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// Fields after the command name, which is in parentheses and may hold
	// spaces: state is field 3, ppid 4, utime 14 and stime 15.
	f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	ppid, _ = strconv.Atoi(f[1])
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return ppid, time.Duration(utime+stime) * 10 * time.Millisecond, nil
}

// OpenFDs counts the process's open file descriptors.
func OpenFDs(pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	Check(err)
	return len(ents)
}

// Scrape reads a sidecar's /metrics into series → value (empty when the
// admin listener does not answer).
func Scrape(admin string) map[string]float64 {
	out := map[string]float64{}
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for line := range strings.SplitSeq(string(body), "\n") {
		if i := strings.LastIndexByte(line, ' '); i > 0 && !strings.HasPrefix(line, "#") {
			v, _ := strconv.ParseFloat(line[i+1:], 64)
			out[line[:i]] = v
		}
	}
	return out
}
