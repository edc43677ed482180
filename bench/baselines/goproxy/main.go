// Command goproxy mirrors the data path of Google's Go alloydb-auth-proxy
// (cloud.google.com/go/alloydbconn + proxy.go) for benchmarking: per client
// connection it dials <ip>:5433 with TLS 1.3 and a client certificate, does
// the metadata exchange exactly like the Go connector (one Write of the
// request, one Read of the 4-byte length, one Read of the body), checks the
// response is OK, then copies both directions with a Read/Write loop and an
// 8 KiB buffer each; the first direction to end closes both connections.
//
// Standard library only. Routes: -route 127.0.0.1:6000=127.100.0.2 (repeatable).
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"strings"
	"sync"
	"time"
)

type routes []string

func (r *routes) String() string     { return strings.Join(*r, ",") }
func (r *routes) Set(v string) error { *r = append(*r, v); return nil }

var (
	certFile  = flag.String("cert", "", "client certificate chain: leaf + intermediate (PEM)")
	keyFile   = flag.String("key", "", "client private key (PEM)")
	caFile    = flag.String("ca", "", "cluster root CA (PEM)")
	userAgent = flag.String("user-agent", "alloydb-go-connector/1.0.0+bench", "MDX user agent")
	token     = flag.String("token", "bench-token", "MDX OAuth2 token")
	routeList routes
)

func main() {
	flag.Var(&routeList, "route", "LISTEN=TARGETIP (repeatable); dials TARGETIP:5433")
	flag.Parse()
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatal(err)
	}
	caPEM, err := os.ReadFile(*caFile)
	if err != nil {
		log.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		log.Fatal("no CA certificate in -ca")
	}
	if len(routeList) == 0 {
		log.Fatal("at least one -route is needed")
	}
	for _, r := range routeList {
		parts := strings.SplitN(r, "=", 2)
		if len(parts) != 2 {
			log.Fatalf("bad -route %q", r)
		}
		ln, err := net.Listen("tcp", parts[0])
		if err != nil {
			log.Fatal(err)
		}
		cfg := &tls.Config{
			Certificates: []tls.Certificate{cert},
			RootCAs:      pool,
			ServerName:   parts[1],
			MinVersion:   tls.VersionTLS13,
		}
		go serve(ln, net.JoinHostPort(parts[1], "5433"), cfg)
	}
	fmt.Println("The proxy has started successfully and is ready for new connections!")
	select {}
}

func mdxRequest() []byte {
	varint := func(b []byte, v int) []byte {
		for v >= 0x80 {
			b = append(b, byte(v)|0x80)
			v >>= 7
		}
		return append(b, byte(v))
	}
	var body []byte
	body = append(body, 0x0a)
	body = varint(body, len(*userAgent))
	body = append(body, *userAgent...)
	body = append(body, 0x10, 0x01) // auth_type = DB_NATIVE
	body = append(body, 0x1a)
	body = varint(body, len(*token))
	body = append(body, *token...)
	out := make([]byte, 4, 4+len(body))
	binary.BigEndian.PutUint32(out, uint32(len(body)))
	return append(out, body...)
}

func serve(ln net.Listener, target string, cfg *tls.Config) {
	req := mdxRequest()
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Print(err)
			return
		}
		go handle(c, target, cfg, req)
	}
}

func dial(target string, cfg *tls.Config, req []byte) (*tls.Conn, error) {
	d := net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	raw, err := d.Dial("tcp", target)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(raw, cfg)
	if err := tc.Handshake(); err != nil {
		raw.Close()
		return nil, err
	}
	if _, err := tc.Write(req); err != nil {
		tc.Close()
		return nil, err
	}
	hdr := make([]byte, 4)
	if _, err := tc.Read(hdr); err != nil {
		tc.Close()
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr)
	if n > 16*1024 {
		tc.Close()
		return nil, errors.New("MDX response too large")
	}
	body := make([]byte, n)
	if _, err := tc.Read(body); err != nil {
		tc.Close()
		return nil, err
	}
	// Expect MetadataExchangeResponse{response_code: OK} = 08 01.
	if len(body) < 2 || body[0] != 0x08 || body[1] != 0x01 {
		tc.Close()
		return nil, fmt.Errorf("MDX not OK: %x", body)
	}
	return tc, nil
}

func handle(client net.Conn, target string, cfg *tls.Config, req []byte) {
	server, err := dial(target, cfg, req)
	if err != nil {
		log.Printf("dial %s: %v", target, err)
		client.Close()
		return
	}
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			client.Close()
			server.Close()
		})
	}
	go pump(server, client, closeBoth)
	go pump(client, server, closeBoth)
}

// pump is the Go proxy's copy loop (internal/proxy/proxy.go, proxyConn): an
// 8 KiB buffer, Read then Write, until the first error on either side. A
// plain loop, not io.Copy: io.Copy would let *net.TCPConn.ReadFrom take over
// with its own 32 KiB buffer, which the real proxy does not do.
func pump(dst, src net.Conn, done func()) {
	defer done()
	buf := make([]byte, 8*1024)
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if rerr != nil {
			return
		}
	}
}
