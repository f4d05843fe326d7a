// A nats.go client for perch's TLS tests (tests/it/tls.rs runs it): connects
// with the TLS options given, publishes to its own subscription and prints
// "ok" once the message came back. With -expect-refused it prints "refused"
// if the connection (or its first round trip) fails, as it must without a
// client certificate when perch requires one.
//
// Built offline in GOPATH mode, as tests/go is (see tests/run.sh).
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go"
)

func main() {
	url := flag.String("url", "", "tls://127.0.0.1:PORT")
	ca := flag.String("ca", "", "CA file the server certificate is checked against")
	cert := flag.String("cert", "", "client certificate (mTLS)")
	key := flag.String("key", "", "client key (mTLS)")
	refused := flag.Bool("expect-refused", false, "succeed only if the server refuses us")
	flag.Parse()
	opts := []nats.Option{nats.Timeout(5 * time.Second), nats.NoReconnect(), nats.RootCAs(*ca), nats.Secure()}
	if *cert != "" {
		opts = append(opts, nats.ClientCert(*cert, *key))
	}
	err := roundTrip(*url, opts)
	switch {
	case *refused && err != nil:
		fmt.Println("refused:", err)
	case *refused:
		fmt.Println("let in without a certificate")
		os.Exit(1)
	case err != nil:
		fmt.Println("error:", err)
		os.Exit(1)
	default:
		fmt.Println("ok")
	}
}

func roundTrip(url string, opts []nats.Option) error {
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return err
	}
	defer nc.Close()
	sub, err := nc.SubscribeSync("tls.go")
	if err != nil {
		return err
	}
	if err := nc.Publish("tls.go", []byte("hello over tls")); err != nil {
		return err
	}
	msg, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		return err
	}
	if string(msg.Data) != "hello over tls" {
		return fmt.Errorf("got %q", msg.Data)
	}
	if !nc.TLSRequired() {
		return fmt.Errorf("INFO did not say tls_required")
	}
	return nil
}
