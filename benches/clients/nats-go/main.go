// perch-client-nats-go: benchmark traffic from the official NATS Go client
// (nats.go), driven by perch-loadgen (benches/loadgen/src/clients.rs).
//
// It prints machine-readable lines on stdout, one event each, which the
// loadgen reads to time the server's CPU over the same window:
//
//	ready connect_ns=N
//	window-start
//	window-end delivered=N published=N elapsed_ns=N
//	done delivered=N published=N
//
// Any error (connection, async error such as a slow consumer, lost message,
// deadline) goes to stderr and exits 1; the loadgen then fails the run.
//
// Modes:
//
//	version  prints "version nats.go <version>, <go version>" and exits.
//	pub-sub  1 publisher -> 1 subscriber on bench.p, separate connections; the
//	         publisher stays at most -window messages ahead of the subscriber;
//	         counted over -duration-ms after -warmup-ms; at the end every
//	         published message must arrive.
//	fan-in   -devices connections, each publishing -msgs-per-device messages
//	         to sensors.<id>.t once released; 1 subscriber on sensors.>; the
//	         window runs from the release to the last message's arrival.
//
// Build (Debian's golang-github-nats-io-go-nats-dev, no network):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOFLAGS= GOTOOLCHAIN=local \
//	    go build -o target/loadgen-clients/perch-client-nats-go ./benches/clients/nats-go
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

var (
	mode           = flag.String("mode", "pub-sub", "pub-sub, fan-in or version")
	url            = flag.String("url", nats.DefaultURL, "server URL")
	payloadBytes   = flag.Int("payload", 16, "payload bytes")
	warmupMs       = flag.Int("warmup-ms", 300, "pub-sub: unmeasured traffic first")
	durationMs     = flag.Int("duration-ms", 3000, "pub-sub: measured window")
	window         = flag.Uint64("window", 100000, "pub-sub: most messages the publisher may be ahead")
	devices        = flag.Int("devices", 8000, "fan-in: device connections")
	msgsPerDevice  = flag.Int("msgs-per-device", 100, "fan-in: messages each device publishes")
	connectWorkers = flag.Int("connect-threads", 4, "fan-in: goroutines that open the device connections")
	timeoutMs      = flag.Int("timeout-ms", 30000, "bound on every setup, drain and count-bound phase")
)

// failure is set by the first asynchronous error (a callback of any
// connection); every wait checks it.
var failure atomic.Value

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "perch-client-nats-go: "+format+"\n", args...)
	os.Exit(1)
}

func asyncFailed() error {
	if err, ok := failure.Load().(error); ok {
		return err
	}
	return nil
}

func recordFailure(err error) {
	failure.CompareAndSwap(nil, err)
}

func emit(line string) {
	// os.Stdout is unbuffered: the loadgen sees the line when it is written.
	if _, err := os.Stdout.WriteString(line + "\n"); err != nil {
		fail("writing to stdout: %v", err)
	}
}

func timeout() time.Duration { return time.Duration(*timeoutMs) * time.Millisecond }

// connect opens one connection that never reconnects and reports any
// asynchronous error or unexpected disconnect as a failure.
func connect(name string) (*nats.Conn, error) {
	return nats.Connect(*url,
		nats.Name(name),
		nats.NoReconnect(),
		nats.Timeout(timeout()),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = " on " + sub.Subject
			}
			recordFailure(fmt.Errorf("%s: async error%s: %w", name, subject, err))
		}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				recordFailure(fmt.Errorf("%s: disconnected: %w", name, err))
			}
		}),
	)
}

// waitFor polls cond until it holds; false on deadline or async failure.
func waitFor(deadline time.Time, cond func() bool) bool {
	for !cond() {
		if asyncFailed() != nil || time.Now().After(deadline) {
			return false
		}
		time.Sleep(100 * time.Microsecond)
	}
	return true
}

func checkAsync() {
	if err := asyncFailed(); err != nil {
		fail("%v", err)
	}
}

func pubSub() {
	payload := bytes.Repeat([]byte{'x'}, *payloadBytes)
	var received atomic.Uint64
	sub, err := connect("perch-loadgen nats.go subscriber")
	if err != nil {
		fail("subscriber connect: %v", err)
	}
	defer sub.Close()
	s, err := sub.Subscribe("bench.p", func(*nats.Msg) { received.Add(1) })
	if err != nil {
		fail("subscribe: %v", err)
	}
	if err := s.SetPendingLimits(-1, -1); err != nil {
		fail("pending limits: %v", err)
	}
	// The SUB is in place on the server once its PONG is back.
	if err := sub.FlushTimeout(timeout()); err != nil {
		fail("subscriber flush: %v", err)
	}
	pub, err := connect("perch-loadgen nats.go publisher")
	if err != nil {
		fail("publisher connect: %v", err)
	}
	defer pub.Close()
	emit("ready connect_ns=0")

	var published atomic.Uint64
	var stop atomic.Bool
	publisherDone := make(chan error, 1)
	go func() {
		var count uint64
		for !stop.Load() {
			if count-received.Load() >= *window {
				if asyncFailed() != nil {
					break
				}
				time.Sleep(50 * time.Microsecond)
				continue
			}
			if err := pub.Publish("bench.p", payload); err != nil {
				publisherDone <- fmt.Errorf("publish after %d messages: %w", count, err)
				return
			}
			count++
			if count%256 == 0 {
				published.Store(count)
			}
		}
		published.Store(count)
		// Everything published has been processed by the server once
		// the PONG to this PING is back.
		publisherDone <- pub.FlushTimeout(timeout())
	}()

	time.Sleep(time.Duration(*warmupMs) * time.Millisecond)
	checkAsync()
	startDelivered, startPublished := received.Load(), published.Load()
	started := time.Now()
	emit("window-start")
	time.Sleep(time.Duration(*durationMs) * time.Millisecond)
	endDelivered, endPublished := received.Load(), published.Load()
	elapsed := time.Since(started)
	emit(fmt.Sprintf("window-end delivered=%d published=%d elapsed_ns=%d",
		endDelivered-startDelivered, endPublished-startPublished, elapsed.Nanoseconds()))
	stop.Store(true)
	if err := <-publisherDone; err != nil {
		fail("publisher: %v", err)
	}
	checkAsync()
	total := published.Load()
	if !waitFor(time.Now().Add(timeout()), func() bool { return received.Load() >= total }) {
		checkAsync()
		fail("subscriber received %d of %d messages within %v after publishing stopped",
			received.Load(), total, timeout())
	}
	if got := received.Load(); got != total {
		fail("subscriber received %d messages, %d were published", got, total)
	}
	emit(fmt.Sprintf("done delivered=%d published=%d", received.Load(), total))
}

func fanIn() {
	payload := bytes.Repeat([]byte{'x'}, *payloadBytes)
	expected := uint64(*devices) * uint64(*msgsPerDevice)
	var received atomic.Uint64
	// Both instants as time since base, so the callback reads no variable
	// the main goroutine writes.
	base := time.Now()
	var finishedAt atomic.Int64 // set by the last message
	allArrived := make(chan struct{})
	sub, err := connect("perch-loadgen nats.go subscriber")
	if err != nil {
		fail("subscriber connect: %v", err)
	}
	defer sub.Close()
	s, err := sub.Subscribe("sensors.>", func(*nats.Msg) {
		if received.Add(1) == expected {
			finishedAt.Store(int64(time.Since(base)))
			close(allArrived)
		}
	})
	if err != nil {
		fail("subscribe: %v", err)
	}
	if err := s.SetPendingLimits(-1, -1); err != nil {
		fail("pending limits: %v", err)
	}
	if err := sub.FlushTimeout(timeout()); err != nil {
		fail("subscriber flush: %v", err)
	}

	// Devices connect from a few goroutines before the clock starts.
	conns := make([]*nats.Conn, *devices)
	connectStarted := time.Now()
	var wg sync.WaitGroup
	var connectErr atomic.Value
	workers := *connectWorkers
	if workers < 1 {
		workers = 1
	}
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(first int) {
			defer wg.Done()
			for id := first; id < *devices; id += workers {
				if connectErr.Load() != nil {
					return
				}
				nc, err := connect("perch-loadgen nats.go device " + strconv.Itoa(id))
				if err != nil {
					connectErr.CompareAndSwap(nil, fmt.Errorf("device %d connect: %w", id, err))
					return
				}
				conns[id] = nc
			}
		}(w)
	}
	wg.Wait()
	defer func() {
		for _, nc := range conns {
			if nc != nil {
				nc.Close()
			}
		}
	}()
	if err, ok := connectErr.Load().(error); ok {
		fail("%v", err)
	}
	checkAsync()
	emit(fmt.Sprintf("ready connect_ns=%d", time.Since(connectStarted).Nanoseconds()))

	subjects := make([]string, *devices)
	for id := range subjects {
		subjects[id] = "sensors." + strconv.Itoa(id) + ".t"
	}
	release := make(chan struct{})
	publishErrs := make(chan error, *devices)
	for id, nc := range conns {
		go func(id int, nc *nats.Conn) {
			<-release
			for i := 0; i < *msgsPerDevice; i++ {
				if err := nc.Publish(subjects[id], payload); err != nil {
					publishErrs <- fmt.Errorf("device %d publish: %w", id, err)
					return
				}
			}
		}(id, nc)
	}
	emit("window-start")
	started := time.Since(base)
	close(release)
	select {
	case <-allArrived:
	case err := <-publishErrs:
		fail("%v", err)
	case <-time.After(timeout()):
		checkAsync()
		fail("subscriber received %d of %d messages within %v", received.Load(), expected, timeout())
	}
	elapsed := time.Duration(finishedAt.Load()) - started
	emit(fmt.Sprintf("window-end delivered=%d published=%d elapsed_ns=%d",
		expected, expected, elapsed.Nanoseconds()))
	checkAsync()
	// No more than expected: nothing else publishes to sensors.>.
	time.Sleep(10 * time.Millisecond)
	if got := received.Load(); got != expected {
		fail("subscriber received %d messages, %d were published", got, expected)
	}
	emit(fmt.Sprintf("done delivered=%d published=%d", expected, expected))
}

func main() {
	flag.Parse()
	// A hard bound on the whole run, whatever hangs.
	limit := time.Duration(*warmupMs+*durationMs)*time.Millisecond + 4*timeout()
	time.AfterFunc(limit, func() { fail("still running after %v", limit) })
	switch *mode {
	case "version":
		emit(fmt.Sprintf("version nats.go %s, %s", nats.Version, runtime.Version()))
	case "pub-sub":
		pubSub()
	case "fan-in":
		fanIn()
	default:
		fail("unknown -mode %q (pub-sub, fan-in or version)", *mode)
	}
}
