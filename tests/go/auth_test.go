package perchclient

// Authentication and permissions with nats.go: nkeys (Debian's Go nkeys signs
// the nonce), user/password, token, a permissions violation reported to the
// client's error handler, and allow_responses. Each test starts a server of
// its own with a config file: perch from PERCH_BIN (behind PERCH_RUNNER, on
// PERCH_IO), or nats-server with NATS_REFERENCE=1 and the same users in its
// syntax. tests/run.sh sets these.

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// startWithConfig starts a server with the given config and returns its URL.
func startWithConfig(t *testing.T, perchTOML, natsConf string) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	dir := t.TempDir()
	var cmd *exec.Cmd
	if os.Getenv("NATS_REFERENCE") == "1" {
		path := filepath.Join(dir, "nats.conf")
		if err := os.WriteFile(path, []byte(natsConf), 0o600); err != nil {
			t.Fatal(err)
		}
		cmd = exec.Command("nats-server", "-a", "127.0.0.1", "-p", strconv.Itoa(port), "-c", path)
	} else {
		bin := os.Getenv("PERCH_BIN")
		if bin == "" {
			// Never skip: tests/run.sh sets PERCH_BIN.
			t.Fatal("PERCH_BIN is not set")
		}
		path := filepath.Join(dir, "perch.toml")
		if err := os.WriteFile(path, []byte(perchTOML), 0o600); err != nil {
			t.Fatal(err)
		}
		io := os.Getenv("PERCH_IO")
		if io == "" {
			io = "auto"
		}
		args := append(strings.Fields(os.Getenv("PERCH_RUNNER")), bin, "serve",
			"--listen", "127.0.0.1:"+strconv.Itoa(port), "--io", io, "--shards", "2",
			"--placement", "round-robin", "--config", path)
		cmd = exec.Command(args[0], args[1:]...)
	}
	logPath := filepath.Join(dir, "server.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("start server: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		logFile.Close()
	})
	deadline := time.Now().Add(30 * time.Second) // qemu-user starts slowly
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
		if err == nil {
			_ = c.SetReadDeadline(time.Now().Add(time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if strings.HasPrefix(line, "INFO ") {
				return "nats://127.0.0.1:" + strconv.Itoa(port)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	log, _ := os.ReadFile(logPath)
	t.Fatalf("server sent no INFO within 30 s; its log:\n%s", log)
	return ""
}

func connectTo(t *testing.T, url string, opts ...nats.Option) (*nats.Conn, error) {
	t.Helper()
	opts = append([]nats.Option{nats.Timeout(wait), nats.NoReconnect()}, opts...)
	nc, err := nats.Connect(url, opts...)
	if err == nil {
		t.Cleanup(nc.Close)
	}
	return nc, err
}

// hunter2 is bcrypt("hunter2", cost 4).
const hunter2 = "$2a$04$JDtkF5f/kylSyv5dkhx06Ol1dHYTs6hKmP1edYZWi286raHBL0NEC"

func TestAuthNkeyUserPasswordAndPermissions(t *testing.T) {
	device, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	public, err := device.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	stranger, _ := nkeys.CreateUser()
	url := startWithConfig(t,
		`[authorization]
users = [
  { user = "ops", password = "`+hunter2+`" },
  { nkey = "`+public+`", permissions = { publish = ["sensors.>"], subscribe = ["cmd.>"] } },
]
`,
		`authorization { users = [
  { user: ops, password: "`+hunter2+`" },
  { nkey: `+public+`, permissions: { publish: ["sensors.>"], subscribe: ["cmd.>"] } },
] }
`)
	ops, err := connectTo(t, url, nats.UserInfo("ops", "hunter2"))
	if err != nil {
		t.Fatalf("ops: %v", err)
	}
	readings, err := ops.SubscribeSync("sensors.>")
	if err != nil {
		t.Fatal(err)
	}
	flush(t, ops)

	violations := make(chan error, 4)
	dev, err := connectTo(t, url,
		nats.Nkey(public, device.Sign),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { violations <- err }))
	if err != nil {
		t.Fatalf("the nkey user signs the nonce: %v", err)
	}
	if err := dev.Publish("sensors.t1", []byte("21.5")); err != nil {
		t.Fatal(err)
	}
	if err := dev.Publish("cmd.reboot", []byte("denied")); err != nil {
		t.Fatal(err)
	}
	flush(t, dev)
	if m := next(t, readings); m.Subject != "sensors.t1" || string(m.Data) != "21.5" {
		t.Fatalf("got %q %q", m.Subject, m.Data)
	}
	select {
	case err := <-violations:
		if !strings.Contains(strings.ToLower(err.Error()), `permissions violation for publish to "cmd.reboot"`) {
			t.Fatalf("unexpected error: %v", err)
		}
	case <-time.After(wait):
		t.Fatal("no permissions violation reported")
	}
	if dev.IsClosed() {
		t.Fatal("a permissions violation must keep the connection open")
	}
	expectNothing(t, readings, dev, ops)

	strangerPublic, _ := stranger.PublicKey()
	for name, opt := range map[string]nats.Option{
		"unknown nkey":   nats.Nkey(strangerPublic, stranger.Sign),
		"forged nonce":   nats.Nkey(public, stranger.Sign),
		"wrong password": nats.UserInfo("ops", "wrong"),
		"no credentials": nats.Name("anonymous"),
	} {
		if _, err := connectTo(t, url, opt); err == nil {
			t.Errorf("%s: connected", name)
		} else if !strings.Contains(strings.ToLower(err.Error()), "authorization violation") {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestAuthTokenAndAllowResponses(t *testing.T) {
	url := startWithConfig(t,
		`[authorization]
users = [
  { user = "svc", password = "s", permissions = { subscribe = ["svc.>"], allow_responses = { max = 2 } } },
  { user = "cli", password = "c" },
]
`,
		`authorization { users = [
  { user: svc, password: s, permissions: { subscribe: "svc.>", allow_responses: { max: 2 } } },
  { user: cli, password: c },
] }
`)
	denied := make(chan error, 8)
	svc, err := connectTo(t, url, nats.UserInfo("svc", "s"),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { denied <- err }))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Subscribe("svc.count", func(m *nats.Msg) {
		_ = m.Respond([]byte("1"))
		_ = m.Respond([]byte("2"))
		_ = m.Respond([]byte("3")) // over max = 2
	}); err != nil {
		t.Fatal(err)
	}
	flush(t, svc)
	cli, err := connectTo(t, url, nats.UserInfo("cli", "c"))
	if err != nil {
		t.Fatal(err)
	}
	inbox := nats.NewInbox()
	replies, err := cli.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.PublishRequest("svc.count", inbox, nil); err != nil {
		t.Fatal(err)
	}
	flush(t, cli)
	for _, want := range []string{"1", "2"} {
		if m := next(t, replies); string(m.Data) != want {
			t.Fatalf("reply %q, want %q", m.Data, want)
		}
	}
	select {
	case err := <-denied:
		if !strings.Contains(strings.ToLower(err.Error()), `publish to "`+strings.ToLower(inbox)+`"`) {
			t.Fatalf("unexpected error: %v", err)
		}
	case <-time.After(wait):
		t.Fatal("the third response was not refused")
	}
	expectNothing(t, replies, svc, cli)

	tokenURL := startWithConfig(t, "[authorization]\ntoken = \"s3cr3t\"\n", "authorization { token: \"s3cr3t\" }\n")
	if _, err := connectTo(t, tokenURL, nats.Token("s3cr3t")); err != nil {
		t.Fatalf("token: %v", err)
	}
	if _, err := connectTo(t, tokenURL, nats.Token("nope")); err == nil {
		t.Fatal("a wrong token connected")
	}
}
