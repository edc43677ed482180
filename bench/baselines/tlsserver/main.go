// Command tlsserver is the benchmark's instance side: an AlloyDB-like TLS 1.3
// server on <ip>:5433 that requires a client certificate signed by the
// cluster root, answers the metadata exchange (MDX) with OK and then, per
// -mode:
//
//	sink   client sends an 8-byte big-endian count N, then N bytes; the server
//	       discards them and answers with the same 8-byte count (an ack);
//	       repeatable on one connection.
//	source client sends an 8-byte big-endian count N; the server writes N
//	       bytes; repeatable on one connection.
//	echo   writes back whatever it reads.
//	pg     relays to a PostgreSQL server (-pg host:port) over plain TCP.
//
// Standard library only. One server is used behind every path so the
// comparison between proxies is fair.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
)

var (
	listen   = flag.String("listen", "", "address to listen on, e.g. 127.100.0.2:5433")
	certFile = flag.String("cert", "", "server certificate chain (PEM)")
	keyFile  = flag.String("key", "", "server private key (PEM)")
	caFile   = flag.String("ca", "", "root CA that signs client certificates (PEM)")
	mode     = flag.String("mode", "echo", "sink | source | echo | pg")
	pgAddr   = flag.String("pg", "", "PostgreSQL host:port for -mode pg")
	bufSize  = flag.Int("buf", 256*1024, "read/write buffer size for sink/source")
)

func main() {
	flag.Parse()
	switch *mode {
	case "sink", "source", "echo", "pg":
	default:
		log.Fatalf("unknown -mode %q", *mode)
	}
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
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		MinVersion:   tls.VersionTLS13,
	}
	ln, err := tls.Listen("tcp", *listen, cfg)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("READY %s %s\n", ln.Addr(), *mode)
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go handle(c.(*tls.Conn))
	}
}

func readFull(c io.Reader, n int) ([]byte, error) {
	b := make([]byte, n)
	_, err := io.ReadFull(c, b)
	return b, err
}

func handle(c *tls.Conn) {
	defer c.Close()
	if err := c.Handshake(); err != nil {
		return
	}
	hdr, err := readFull(c, 4)
	if err != nil {
		return
	}
	n := binary.BigEndian.Uint32(hdr)
	if n > 16*1024 {
		return
	}
	if _, err := readFull(c, int(n)); err != nil {
		return
	}
	// MetadataExchangeResponse{response_code: OK}
	if _, err := c.Write([]byte{0, 0, 0, 2, 0x08, 0x01}); err != nil {
		return
	}
	switch *mode {
	case "sink":
		for {
			b, err := readFull(c, 8)
			if err != nil {
				return
			}
			want := int64(binary.BigEndian.Uint64(b))
			buf := make([]byte, *bufSize)
			var got int64
			for got < want {
				chunk := buf
				if rest := want - got; rest < int64(len(chunk)) {
					chunk = chunk[:rest]
				}
				k, err := c.Read(chunk)
				got += int64(k)
				if err != nil {
					return
				}
			}
			if _, err := c.Write(b); err != nil {
				return
			}
		}
	case "source":
		buf := make([]byte, *bufSize)
		for i := range buf {
			buf[i] = byte(i)
		}
		for {
			b, err := readFull(c, 8)
			if err != nil {
				return
			}
			want := int64(binary.BigEndian.Uint64(b))
			var sent int64
			for sent < want {
				chunk := buf
				if rest := want - sent; rest < int64(len(chunk)) {
					chunk = chunk[:rest]
				}
				k, err := c.Write(chunk)
				sent += int64(k)
				if err != nil {
					return
				}
			}
		}
	case "echo":
		buf := make([]byte, 16*1024)
		for {
			k, err := c.Read(buf)
			if k > 0 {
				if _, werr := c.Write(buf[:k]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	case "pg":
		up, err := net.Dial("tcp", *pgAddr)
		if err != nil {
			return
		}
		defer up.Close()
		done := make(chan struct{}, 2)
		go func() { io.Copy(up, c); done <- struct{}{} }()
		go func() { io.Copy(c, up); done <- struct{}{} }()
		<-done
	}
}
