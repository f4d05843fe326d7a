// Real-client tests with the official Go client (nats.go, from Debian's
// golang-github-nats-io-go-nats-dev). They talk to whatever server NATS_URL
// names: tests/run.sh starts perch once per I/O backend and points NATS_URL at
// it; point it at a nats-server to check the tests themselves against the
// reference.
//
// Built offline in GOPATH mode (no go.mod, no module proxy):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off \
//	    NATS_URL=nats://127.0.0.1:4222 go test -count=1 -v ./tests/go/
//
// Publisher and subscriber always use separate connections: perch started with
// --placement round-robin puts consecutive connections on different shards, so
// these tests cross shards. Every wait is bounded.
package perchclient

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// wait bounds every single receive; whole tests bound themselves separately.
const wait = 5 * time.Second

var serverURL string

func TestMain(m *testing.M) {
	serverURL = os.Getenv("NATS_URL")
	if serverURL == "" {
		// Never skip: a suite that silently ran nothing must not look green.
		fmt.Fprintln(os.Stderr, "NATS_URL is not set: start a server and export NATS_URL (tests/run.sh does this)")
		os.Exit(2)
	}
	os.Exit(m.Run())
}

// connect opens a connection that fails the test on any asynchronous error
// (slow consumer, protocol error) and is closed when the test ends.
func connect(t *testing.T, opts ...nats.Option) *nats.Conn {
	t.Helper()
	opts = append([]nats.Option{
		nats.Name(t.Name()),
		nats.Timeout(wait),
		nats.NoReconnect(),
		nats.ErrorHandler(func(_ *nats.Conn, s *nats.Subscription, err error) {
			subj := ""
			if s != nil {
				subj = s.Subject
			}
			t.Errorf("async error on %q: %v", subj, err)
		}),
	}, opts...)
	nc, err := nats.Connect(serverURL, opts...)
	if err != nil {
		t.Fatalf("connect %s: %v", serverURL, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

func flush(t *testing.T, nc *nats.Conn) {
	t.Helper()
	if err := nc.FlushTimeout(wait); err != nil {
		t.Fatalf("flush: %v", err)
	}
}

func next(t *testing.T, sub *nats.Subscription) *nats.Msg {
	t.Helper()
	m, err := sub.NextMsg(wait)
	if err != nil {
		t.Fatalf("NextMsg on %q: %v", sub.Subject, err)
	}
	return m
}

// expectNothing checks no message is pending on sub once the publisher's and
// the subscriber's connections have both round-tripped the server.
func expectNothing(t *testing.T, sub *nats.Subscription, conns ...*nats.Conn) {
	t.Helper()
	for _, nc := range conns {
		flush(t, nc)
	}
	if m, err := sub.NextMsg(200 * time.Millisecond); err == nil {
		t.Fatalf("unexpected message on %q: subject %q data %q", sub.Subject, m.Subject, m.Data)
	} else if !errors.Is(err, nats.ErrTimeout) {
		t.Fatalf("NextMsg: %v", err)
	}
}

func TestConnectFlushRTT(t *testing.T) {
	nc := connect(t)
	flush(t, nc)
	if _, err := nc.RTT(); err != nil {
		t.Fatalf("RTT: %v", err)
	}
	if !nc.HeadersSupported() {
		t.Fatalf("server does not announce headers support")
	}
	if nc.MaxPayload() <= 0 {
		t.Fatalf("server announced max_payload %d", nc.MaxPayload())
	}
}

func TestPubSubAcrossConnections(t *testing.T) {
	pub, subc := connect(t), connect(t)
	sub, err := subc.SubscribeSync("greet.one")
	if err != nil {
		t.Fatal(err)
	}
	flush(t, subc)
	if err := pub.Publish("greet.one", []byte("hello")); err != nil {
		t.Fatal(err)
	}
	m := next(t, sub)
	if m.Subject != "greet.one" || string(m.Data) != "hello" {
		t.Fatalf("got subject %q data %q", m.Subject, m.Data)
	}
	// Empty payloads are legal.
	if err := pub.Publish("greet.one", nil); err != nil {
		t.Fatal(err)
	}
	if m := next(t, sub); len(m.Data) != 0 {
		t.Fatalf("empty payload arrived as %q", m.Data)
	}
	// A subject nobody subscribed to is not delivered here.
	if err := pub.Publish("greet.two", []byte("x")); err != nil {
		t.Fatal(err)
	}
	expectNothing(t, sub, pub, subc)
}

func TestWildcards(t *testing.T) {
	pub, subc := connect(t), connect(t)
	star, err := subc.SubscribeSync("wild.*.temp")
	if err != nil {
		t.Fatal(err)
	}
	full, err := subc.SubscribeSync("wild.>")
	if err != nil {
		t.Fatal(err)
	}
	flush(t, subc)

	// subject -> whether "wild.*.temp" matches; "wild.>" matches them all.
	cases := []struct {
		subject string
		star    bool
	}{
		{"wild.a.temp", true},
		{"wild.b.temp", true},
		{"wild.a.b.temp", false},
		{"wild.a.humidity", false},
		{"wild.temp", false},
		{"wild.a.temp.x", false},
	}
	for _, c := range cases {
		if err := pub.Publish(c.subject, []byte(c.subject)); err != nil {
			t.Fatal(err)
		}
	}
	// "wild" alone matches neither: ">" needs at least one more token.
	if err := pub.Publish("wild", []byte("wild")); err != nil {
		t.Fatal(err)
	}
	flush(t, pub)

	for _, c := range cases {
		m := next(t, full)
		if m.Subject != c.subject {
			t.Fatalf("wild.> got %q, want %q (in publish order)", m.Subject, c.subject)
		}
	}
	for _, c := range cases {
		if !c.star {
			continue
		}
		m := next(t, star)
		if m.Subject != c.subject {
			t.Fatalf("wild.*.temp got %q, want %q", m.Subject, c.subject)
		}
	}
	expectNothing(t, star, pub, subc)
	expectNothing(t, full)
}

func TestQueueGroupExactlyOnce(t *testing.T) {
	const n = 3000
	const members = 3
	pub := connect(t)
	var mu sync.Mutex
	seen := make(map[int]int) // message number -> deliveries to the group
	perMember := make([]int, members)
	var total int64
	done := make(chan struct{})

	var conns []*nats.Conn
	for i := 0; i < members; i++ {
		i := i
		nc := connect(t) // one connection each: spread over the shards
		conns = append(conns, nc)
		_, err := nc.QueueSubscribe("work.items", "workers", func(m *nats.Msg) {
			k, err := strconv.Atoi(string(m.Data))
			if err != nil {
				t.Errorf("bad payload %q", m.Data)
				return
			}
			mu.Lock()
			seen[k]++
			perMember[i]++
			mu.Unlock()
			if atomic.AddInt64(&total, 1) == n {
				close(done)
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		flush(t, nc)
	}
	// A plain subscriber on the same subject gets every message, independently
	// of the group.
	plainc := connect(t)
	var plain int64
	if _, err := plainc.Subscribe("work.items", func(*nats.Msg) { atomic.AddInt64(&plain, 1) }); err != nil {
		t.Fatal(err)
	}
	flush(t, plainc)

	for k := 0; k < n; k++ {
		if err := pub.Publish("work.items", []byte(strconv.Itoa(k))); err != nil {
			t.Fatal(err)
		}
	}
	flush(t, pub)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("queue group received %d of %d messages", atomic.LoadInt64(&total), n)
	}
	// Give duplicates a chance to show up before counting.
	for _, nc := range append(conns, plainc) {
		flush(t, nc)
	}
	time.Sleep(300 * time.Millisecond)

	mu.Lock()
	defer mu.Unlock()
	if len(seen) != n {
		t.Fatalf("%d distinct messages reached the group, want %d", len(seen), n)
	}
	for k, c := range seen {
		if c != 1 {
			t.Fatalf("message %d delivered %d times to the group", k, c)
		}
	}
	for i, c := range perMember {
		// Load is spread: with 3000 messages every member gets some.
		if c == 0 {
			t.Fatalf("member %d got no messages (per member: %v)", i, perMember)
		}
	}
	if got := atomic.LoadInt64(&plain); got != n {
		t.Fatalf("plain subscriber got %d of %d", got, n)
	}
	t.Logf("per member: %v", perMember)
}

func TestRequestReply(t *testing.T) {
	svc, client := connect(t), connect(t)
	_, err := svc.Subscribe("svc.echo", func(m *nats.Msg) {
		if err := m.Respond(append([]byte("re:"), m.Data...)); err != nil {
			t.Errorf("respond: %v", err)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	flush(t, svc)
	for i := 0; i < 100; i++ {
		body := fmt.Sprintf("q%d", i)
		resp, err := client.Request("svc.echo", []byte(body), wait)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if string(resp.Data) != "re:"+body {
			t.Fatalf("request %d: got %q", i, resp.Data)
		}
	}
}

// The old request style: a fresh inbox subscription per request instead of
// one shared wildcard inbox.
func TestRequestOldStyle(t *testing.T) {
	svc := connect(t)
	client := connect(t, nats.UseOldRequestStyle())
	if _, err := svc.Subscribe("svc.old", func(m *nats.Msg) { m.Respond([]byte("ok")) }); err != nil {
		t.Fatal(err)
	}
	flush(t, svc)
	resp, err := client.Request("svc.old", []byte("x"), wait)
	if err != nil {
		t.Fatalf("old-style request: %v", err)
	}
	if string(resp.Data) != "ok" {
		t.Fatalf("got %q", resp.Data)
	}
}

func TestNoResponders(t *testing.T) {
	nc := connect(t)
	start := time.Now()
	_, err := nc.Request("nobody.listens.here", []byte("?"), wait)
	if !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("want nats.ErrNoResponders, got %v", err)
	}
	// The server answers at once: the client did not wait out its timeout.
	if d := time.Since(start); d > wait/2 {
		t.Fatalf("no-responders answer took %v", d)
	}
}

func TestHeaders(t *testing.T) {
	pub, subc := connect(t), connect(t)
	sub, err := subc.SubscribeSync("hdr.test")
	if err != nil {
		t.Fatal(err)
	}
	flush(t, subc)

	msg := nats.NewMsg("hdr.test")
	msg.Header.Set("X-One", "1")
	msg.Header.Add("X-Multi", "a")
	msg.Header.Add("X-Multi", "b")
	msg.Data = []byte("with headers")
	if err := pub.PublishMsg(msg); err != nil {
		t.Fatal(err)
	}
	// A message with headers and an empty body.
	empty := nats.NewMsg("hdr.test")
	empty.Header.Set("Only", "header")
	if err := pub.PublishMsg(empty); err != nil {
		t.Fatal(err)
	}

	m := next(t, sub)
	if string(m.Data) != "with headers" {
		t.Fatalf("data %q", m.Data)
	}
	if got := m.Header.Get("X-One"); got != "1" {
		t.Fatalf("X-One = %q", got)
	}
	if got := m.Header.Values("X-Multi"); len(got) != 2 || got[0] != "a" || got[1] != "b" {
		t.Fatalf("X-Multi = %q", got)
	}
	m = next(t, sub)
	if len(m.Data) != 0 || m.Header.Get("Only") != "header" {
		t.Fatalf("header-only message: data %q header %v", m.Data, m.Header)
	}

	// Headers survive request/reply in both directions.
	svc := connect(t)
	if _, err := svc.Subscribe("hdr.svc", func(req *nats.Msg) {
		resp := nats.NewMsg(req.Reply)
		resp.Header.Set("Echo", req.Header.Get("Ask"))
		resp.Data = req.Data
		if err := req.RespondMsg(resp); err != nil {
			t.Errorf("respond: %v", err)
		}
	}); err != nil {
		t.Fatal(err)
	}
	flush(t, svc)
	req := nats.NewMsg("hdr.svc")
	req.Header.Set("Ask", "perch")
	req.Data = []byte("body")
	resp, err := pub.RequestMsg(req, wait)
	if err != nil {
		t.Fatalf("request with headers: %v", err)
	}
	if resp.Header.Get("Echo") != "perch" || string(resp.Data) != "body" {
		t.Fatalf("response header %v data %q", resp.Header, resp.Data)
	}
}

func TestAutoUnsubscribe(t *testing.T) {
	pub, subc := connect(t), connect(t)
	sub, err := subc.SubscribeSync("auto.unsub")
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.AutoUnsubscribe(5); err != nil {
		t.Fatal(err)
	}
	flush(t, subc)
	for i := 0; i < 10; i++ {
		if err := pub.Publish("auto.unsub", []byte(strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	flush(t, pub)
	for i := 0; i < 5; i++ {
		if m := next(t, sub); string(m.Data) != strconv.Itoa(i) {
			t.Fatalf("message %d: got %q", i, m.Data)
		}
	}
	// The client closes the subscription after the 5th; nothing more arrives.
	if _, err := sub.NextMsg(300 * time.Millisecond); err == nil {
		t.Fatalf("got a 6th message after AutoUnsubscribe(5)")
	}
	if sub.IsValid() {
		t.Fatalf("subscription still valid after its max")
	}
	// The server must have dropped the interest as well: a fresh
	// subscription on the same connection sees only new messages.
	sub2, err := subc.SubscribeSync("auto.unsub")
	if err != nil {
		t.Fatal(err)
	}
	flush(t, subc)
	pub.Publish("auto.unsub", []byte("after"))
	if m := next(t, sub2); string(m.Data) != "after" {
		t.Fatalf("got %q", m.Data)
	}
}

func TestUnsubscribe(t *testing.T) {
	pub, subc := connect(t), connect(t)
	sub, err := subc.SubscribeSync("unsub.me")
	if err != nil {
		t.Fatal(err)
	}
	watch, err := subc.SubscribeSync("unsub.>")
	if err != nil {
		t.Fatal(err)
	}
	flush(t, subc)
	pub.Publish("unsub.me", []byte("1"))
	next(t, sub)
	next(t, watch)
	if err := sub.Unsubscribe(); err != nil {
		t.Fatal(err)
	}
	flush(t, subc)
	pub.Publish("unsub.me", []byte("2"))
	// The other subscription on the same connection still gets it.
	if m := next(t, watch); string(m.Data) != "2" {
		t.Fatalf("got %q", m.Data)
	}
}

func TestNoEcho(t *testing.T) {
	nc := connect(t, nats.NoEcho())
	other := connect(t)
	sub, err := nc.SubscribeSync("echo.test")
	if err != nil {
		t.Fatal(err)
	}
	flush(t, nc)
	nc.Publish("echo.test", []byte("own")) // not echoed back
	other.Publish("echo.test", []byte("theirs"))
	flush(t, nc)
	flush(t, other)
	if m := next(t, sub); string(m.Data) != "theirs" {
		t.Fatalf("no-echo connection got %q", m.Data)
	}
	expectNothing(t, sub, nc, other)
}

func TestDrain(t *testing.T) {
	const n = 1000
	pub, subc := connect(t), connect(t)
	var got int64
	if _, err := subc.Subscribe("drain.me", func(*nats.Msg) {
		time.Sleep(10 * time.Microsecond) // slow handler: messages queue up
		atomic.AddInt64(&got, 1)
	}); err != nil {
		t.Fatal(err)
	}
	flush(t, subc)
	for i := 0; i < n; i++ {
		pub.Publish("drain.me", []byte("x"))
	}
	flush(t, pub)
	// Wait until the subscriber's client has read all n off the socket (the
	// server may still be routing them between shards when the publisher's
	// flush returns); most still sit in the slow handler's queue.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if subc.Stats().InMsgs == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("subscriber read %d of %d before drain", subc.Stats().InMsgs, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	closed := make(chan struct{})
	subc.SetClosedHandler(func(*nats.Conn) { close(closed) })
	if err := subc.Drain(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-closed:
	case <-time.After(15 * time.Second):
		t.Fatalf("drain did not close the connection")
	}
	if got := atomic.LoadInt64(&got); got != n {
		t.Fatalf("handler saw %d of %d after drain", got, n)
	}
}

func TestManyMessagesInOrder(t *testing.T) {
	const n = 100_000
	pub, subc := connect(t), connect(t)
	var next, bad int64
	done := make(chan struct{})
	sub, err := subc.Subscribe("bulk.seq", func(m *nats.Msg) {
		k, err := strconv.ParseInt(string(m.Data), 10, 64)
		if err != nil || k != next {
			if atomic.AddInt64(&bad, 1) == 1 {
				t.Errorf("message %d: got %q (out of order or corrupt)", next, m.Data)
			}
		}
		next++
		if next == n {
			close(done)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	// Room for the whole burst in the client's queue, so a slow test machine
	// does not turn into a client-side slow consumer.
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		t.Fatal(err)
	}
	flush(t, subc)
	start := time.Now()
	for k := 0; k < n; k++ {
		if err := pub.Publish("bulk.seq", []byte(strconv.Itoa(k))); err != nil {
			t.Fatal(err)
		}
	}
	flush(t, pub)
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		d, _ := sub.Delivered()
		t.Fatalf("received %d of %d", d, n)
	}
	if bad != 0 {
		t.Fatalf("%d messages out of order", bad)
	}
	t.Logf("%d messages in %v", n, time.Since(start))
}

func TestMaxPayload(t *testing.T) {
	pub, subc := connect(t), connect(t)
	max := pub.MaxPayload()
	sub, err := subc.SubscribeSync("big.one")
	if err != nil {
		t.Fatal(err)
	}
	flush(t, subc)
	payload := make([]byte, max)
	for i := range payload {
		payload[i] = byte('a' + i%26)
	}
	if err := pub.Publish("big.one", payload); err != nil {
		t.Fatalf("publish of exactly max_payload (%d): %v", max, err)
	}
	m := next(t, sub)
	if len(m.Data) != len(payload) || string(m.Data) != string(payload) {
		t.Fatalf("payload of %d bytes arrived as %d bytes or changed", len(payload), len(m.Data))
	}
	// One byte over: the client refuses it before sending (it read the limit
	// from the server's INFO).
	if err := pub.Publish("big.one", make([]byte, max+1)); !errors.Is(err, nats.ErrMaxPayload) {
		t.Fatalf("publish of max_payload+1: want nats.ErrMaxPayload, got %v", err)
	}
	// The connection is still usable.
	flush(t, pub)
	pub.Publish("big.one", []byte("small"))
	if m := next(t, sub); string(m.Data) != "small" {
		t.Fatalf("got %q", m.Data)
	}
}
