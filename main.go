// Command sidecar is a reverse proxy that sits in front of any HTTP/1.1
// backend and makes it survive production load. See README.md.
//
// main only wires: flags, config, the proxy and admin listeners, signals,
// drain and reload. Each concern lives in its package (policy, proxy,
// health, demo).
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/reuseport"

	"github.com/sidecar-proxy/sidecar/container"
	"github.com/sidecar-proxy/sidecar/demo"
	"github.com/sidecar-proxy/sidecar/frontend/listen"
	"github.com/sidecar-proxy/sidecar/health"
	"github.com/sidecar-proxy/sidecar/policy"
	"github.com/sidecar-proxy/sidecar/proxy"
)

// version is stamped at build time: -ldflags "-X main.version=1.2.3".
var version = "dev"

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

type options struct {
	config   string
	validate bool
	version  bool
	demo     bool
	logLevel string
	watch    time.Duration
	hashKey  string
	health   bool
}

// minWatchInterval is the shortest -watch-interval accepted.
const minWatchInterval = 100 * time.Millisecond

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("sidecar", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.config, "config", "sidecar.toml", "path of the config file")
	fs.BoolVar(&o.validate, "validate", false, "check the config file, print every problem, and exit (non-zero if invalid)")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	fs.BoolVar(&o.demo, "demo", false, "run on the embedded default config with a built-in demo upstream")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.DurationVar(&o.watch, "watch-interval", 2*time.Second, "how often to check the config and keys files for changes (0 disables; SIGHUP always reloads)")
	fs.StringVar(&o.hashKey, "hash-key", "", "print the keys-file form (hex SHA-256) of an API key and exit")
	fs.BoolVar(&o.health, "healthcheck", false, "probe the admin /healthz of the configured sidecar and exit 0 if it answers 200 (for container HEALTHCHECKs without a shell)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q (flags start with -)", fs.Arg(0))
	}
	if o.watch < 0 || o.watch > 0 && o.watch < minWatchInterval {
		// Each look reads and hashes the config and keys files: 1ns kept a
		// core busy while idle.
		return o, fmt.Errorf("-watch-interval must be 0 (off) or at least %s, got %s", minWatchInterval, o.watch)
	}
	return o, nil
}

func run(args []string, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(stderr, "sidecar:", err)
		return 2
	}
	if o.version {
		fmt.Fprintf(stdout, "sidecar %s (%s)\n", version, runtime.Version())
		return 0
	}
	if o.hashKey != "" {
		fmt.Fprintln(stdout, policy.HashKey(o.hashKey))
		return 0
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		fmt.Fprintf(stderr, "sidecar: -log-level: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewJSONHandler(stdout, &slog.HandlerOptions{Level: level}))

	var snap *policy.Snapshot
	var demoUp interface{ Close() error }
	if o.demo {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fmt.Fprintln(stderr, "sidecar: demo upstream:", err)
			return 1
		}
		demoUp = demo.Start(ln)
		defer demoUp.Close()
		snap, err = policy.Parse("demo", demo.Config("http://"+ln.Addr().String()))
		if err != nil {
			fmt.Fprintln(stderr, "sidecar: BUG: demo config:", err)
			return 1
		}
		o.config, o.watch = "", 0
		log.Info("demo upstream started", "addr", ln.Addr().String(), "endpoints", demo.Endpoints)
	} else {
		snap, err = policy.LoadWith(o.config, policy.OverridesFromEnv())
		if err != nil {
			fmt.Fprintln(stderr, err)
			if o.validate {
				return 1
			}
			fmt.Fprintln(stderr, "sidecar: not started: fix the config (sidecar -validate -config FILE lists every problem)")
			return 1
		}
	}
	if o.validate {
		fmt.Fprintf(stdout, "%s: ok\n%s", o.config, summary(snap))
		return 0
	}
	if o.health {
		return healthcheck(snap.Server.AdminListen, stderr)
	}
	return serve(o, snap, log, stdout, stderr)
}

func summary(s *policy.Snapshot) string {
	var b strings.Builder
	fmt.Fprintf(&b, "listen %s, admin %s\n", s.Server.Listen, s.Server.AdminListen)
	for _, name := range s.UpstreamNames {
		u := s.Upstreams[name]
		urls := make([]string, len(u.Endpoints))
		for i, e := range u.Endpoints {
			urls[i] = e.URL
		}
		fmt.Fprintf(&b, "upstream %s: %s\n", name, strings.Join(urls, ", "))
	}
	for _, r := range s.Routes {
		cond := "path_prefix " + r.PathPrefix
		if r.Host != "" {
			h := r.Host
			if r.Wildcard {
				h = "*" + h
			}
			cond += ", host " + h
		}
		if r.Methods != nil {
			cond += ", methods " + strings.Join(r.Methods, "|")
		}
		fmt.Fprintf(&b, "route %s: %s -> %s\n", r.Name, cond, r.Upstream)
	}
	return b.String()
}

func serve(o options, snap *policy.Snapshot, log *slog.Logger, stdout, stderr io.Writer) int {
	if fs, err := container.HostFS(); err == nil {
		limit, source, _ := container.SetMemoryLimit(fs, container.DefaultRatio)
		log.Info("runtime limits", "gomemlimit", limit, "gomemlimit_source", source, "gomaxprocs", runtime.GOMAXPROCS(0))
	}
	// With metadata the library writes "# HELP name" with no text;
	// health.WritePrometheus fills it in from health/help.go, which needs an
	// entry for every family registered here.
	metrics.ExposeMetadata(true)
	set := metrics.NewSet()
	metrics.RegisterSet(set)
	// An info metric: a gauge that is always 1, its labels the information.
	set.GetOrCreateGauge(fmt.Sprintf(`sidecar_build_info{version=%q,goversion=%q}`, version, runtime.Version()), nil).Set(1)
	reloadOK := set.GetOrCreateCounter(`sidecar_config_reloads_total{result="success"}`)
	reloadFail := set.GetOrCreateCounter(`sidecar_config_reloads_total{result="failure"}`)
	lastReload := set.GetOrCreateGauge(`sidecar_config_last_reload_success_timestamp_seconds`, nil)
	lastReload.Set(float64(time.Now().Unix()))

	px, err := proxy.New(snap, proxy.Settings{Logger: log, Metrics: set, AccessLog: stdout})
	if err != nil {
		fmt.Fprintln(stderr, "sidecar:", err)
		return 1
	}
	defer px.Close()
	lag := health.StartLagProbe(set, 100*time.Millisecond)
	defer lag.Stop()
	srv := px.NewServer(&snap.Server)
	set.GetOrCreateGauge(`sidecar_open_connections`, func() float64 { return float64(int(srv.GetOpenConnectionsCount()) + px.H2Connections()) })

	listenTCP := net.Listen
	if snap.Server.ReusePort {
		listenTCP = reuseport.Listen
	}
	ln, err := listenTCP("tcp", snap.Server.Listen)
	if err != nil {
		fmt.Fprintf(stderr, "sidecar: server.listen: %v\n", err)
		return 1
	}
	var tlsConf *tls.Config
	if snap.Server.TLS != nil {
		// Certificates and client-CA settings come from the current
		// snapshot at every handshake: a reload (or a changed file) swaps
		// them without a restart. ALPN offers h2 and http/1.1.
		protos := []string{"h2", "http/1.1"}
		tlsConf = &tls.Config{
			MinVersion: tls.VersionTLS12,
			NextProtos: protos,
			GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
				t := px.Snapshot().Server.TLS
				if t == nil {
					return nil, errors.New("TLS turned off by a reload: restart to serve plain HTTP")
				}
				return &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*t.Cert},
					ClientCAs: t.ClientCAs, ClientAuth: t.ClientAuth, NextProtos: protos}, nil
			},
		}
		if r := snap.Server.TLS.RedirectListen; r != "" {
			rln, err := net.Listen("tcp", r)
			if err != nil {
				ln.Close()
				fmt.Fprintf(stderr, "sidecar: server.tls.redirect_listen: %v\n", err)
				return 1
			}
			_, tlsPort, _ := net.SplitHostPort(ln.Addr().String())
			redirect := &fasthttp.Server{Handler: redirectToHTTPS(tlsPort), ReadTimeout: 10 * time.Second,
				NoDefaultServerHeader: true, CloseOnShutdown: true}
			go func() { _ = redirect.Serve(rln) }()
			defer redirect.Shutdown() //nolint:errcheck
		}
	}
	// One port, two servers: HTTP/1.1 on fasthttp, HTTP/2 (h2 by ALPN, or
	// h2c by its preface) on net/http.
	split, err := listen.New(ln, listen.Settings{TLSConfig: tlsConf, H2C: snap.Server.H2C,
		HandshakeTimeout: snap.Server.IdleTimeout})
	if err != nil {
		ln.Close()
		fmt.Fprintf(stderr, "sidecar: server.listen: %v\n", err)
		return 1
	}
	h2 := px.NewHTTP2Server(&snap.Server, srv.GetOpenConnectionsCount)
	aln, err := net.Listen("tcp", snap.Server.AdminListen)
	if err != nil {
		ln.Close()
		fmt.Fprintf(stderr, "sidecar: server.admin_listen: %v\n", err)
		return 1
	}
	var state health.State
	admin := &fasthttp.Server{Handler: health.Handler(&state, snap.Server.AdminPprof, func() any { return px.Status() }), ReadTimeout: 10 * time.Second,
		IdleTimeout: time.Minute, NoDefaultServerHeader: true, CloseOnShutdown: true}
	serveErr := make(chan error, 3)
	go func() { serveErr <- srv.Serve(split.HTTP1()) }()
	if tlsConf != nil || snap.Server.H2C {
		go func() { serveErr <- h2.Serve(split.HTTP2()) }()
	}
	go func() { serveErr <- admin.Serve(aln) }()
	state.SetCheck(px.Ready)
	state.SetReady()
	log.Info("sidecar started", "version", version, "config", snap.Source,
		"listen", ln.Addr().String(), "admin_listen", aln.Addr().String(),
		"upstreams", len(snap.Upstreams), "routes", len(snap.Routes),
		"gomaxprocs", runtime.GOMAXPROCS(0), "summary", summary(snap))

	files := snap.Files // watched for changes: config, keys file, JWT key
	reload := func(why string) {
		next, err := policy.LoadWith(o.config, policy.OverridesFromEnv())
		if next != nil {
			files = next.Files
		}
		if err != nil {
			reloadFail.Inc()
			log.Error("config reload rejected; the previous config keeps serving", "trigger", why, "error", err.Error())
			return
		}
		if restart := strings.Join(px.Snapshot().Server.Restart().Changed(next.Server.Restart()), ", "); restart != "" {
			log.Warn("config change needs a restart to take effect; the rest is applied", "keys", restart)
		}
		if err := px.Apply(next); err != nil {
			reloadFail.Inc()
			log.Error("config reload rejected; the previous config keeps serving", "trigger", why, "error", err.Error())
			return
		}
		reloadOK.Inc()
		lastReload.Set(float64(time.Now().Unix()))
		log.Info("config reloaded", "trigger", why, "summary", summary(next))
	}

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	var tick <-chan time.Time
	lastSum := fileSum(files)
	if o.watch > 0 && o.config != "" {
		t := time.NewTicker(o.watch)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case err := <-serveErr:
			log.Error("listener failed", "error", err)
			return 1
		case <-tick:
			// Kubernetes updates a mounted ConfigMap by swapping a symlink,
			// with no signal; polling the content catches that and editors'
			// rename-on-save alike.
			if sum := fileSum(files); sum != nil && !bytes.Equal(sum, lastSum) {
				lastSum = sum
				reload("file change")
			}
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				if o.config == "" {
					log.Warn("SIGHUP ignored: -demo runs on the embedded config")
					continue
				}
				lastSum = fileSum(files)
				reload("SIGHUP")
				continue
			}
			return drain(px.Snapshot(), srv, h2, admin, &state, log)
		}
	}
}

// drain stops gracefully: /readyz fails first, then (after drain_delay) the
// listener closes; requests already read complete, with Connection: close,
// until drain_timeout, after which what is left is cut by the exit.
func drain(snap *policy.Snapshot, srv *fasthttp.Server, h2 *http.Server, admin *fasthttp.Server, state *health.State, log *slog.Logger) int {
	state.StartDrain()
	log.Info("draining", "drain_delay", snap.Server.DrainDelay.String(), "drain_timeout", snap.Server.DrainTimeout.String(),
		"open_connections", srv.GetOpenConnectionsCount())
	time.Sleep(snap.Server.DrainDelay)
	ctx, cancel := context.WithTimeout(context.Background(), snap.Server.DrainTimeout)
	defer cancel()
	h2done := make(chan error, 1)
	go func() { h2done <- h2.Shutdown(ctx) }() // GOAWAY, then the streams in flight finish
	err := srv.ShutdownWithContext(ctx)
	if h2err := <-h2done; err == nil && h2err != nil && !errors.Is(h2err, http.ErrServerClosed) {
		err = h2err
	}
	if err != nil {
		log.Warn("drain deadline reached; cutting what is left", "open_connections", srv.GetOpenConnectionsCount())
	} else {
		log.Info("drained")
	}
	_ = admin.Shutdown()
	return 0
}

// redirectToHTTPS answers plain-HTTP requests with a permanent redirect
// (308: the method and body are kept) to the same URL over HTTPS.
func redirectToHTTPS(tlsPort string) fasthttp.RequestHandler {
	return func(ctx *fasthttp.RequestCtx) {
		host := string(ctx.Host())
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		if tlsPort != "443" {
			host = net.JoinHostPort(host, tlsPort)
		}
		ctx.Response.Header.Set("Location", "https://"+host+string(ctx.RequestURI()))
		ctx.SetStatusCode(fasthttp.StatusPermanentRedirect)
	}
}

// healthcheck asks the running sidecar's admin listener for /healthz.
func healthcheck(admin string, stderr io.Writer) int {
	host, port, err := net.SplitHostPort(admin)
	if err != nil {
		fmt.Fprintln(stderr, "sidecar: healthcheck:", err)
		return 1
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	status, _, err := fasthttp.GetTimeout(nil, "http://"+net.JoinHostPort(host, port)+"/healthz", 2*time.Second)
	if err != nil || status != fasthttp.StatusOK {
		fmt.Fprintf(stderr, "sidecar: healthcheck: status %d, %v\n", status, err)
		return 1
	}
	return 0
}

// fileSum hashes the contents of the files a config was read from (the
// config itself, the API keys file, a JWT public key).
func fileSum(paths []string) []byte {
	if len(paths) == 0 || paths[0] == "demo" {
		return nil
	}
	h := sha256.New()
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		h.Write(data)
	}
	return h.Sum(nil)
}
