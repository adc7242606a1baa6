package nbd

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"io"
	"math/big"
	"net"
	"testing"
	"time"

	"umbra/internal/testutil"
)

func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "umbra-test"},
		DNSNames: []string{"localhost"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA: true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

func optRoundTrip(t *testing.T, c net.Conn, code uint32, data []byte) uint32 {
	t.Helper()
	b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, code)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	if _, err := c.Write(append(b, data...)); err != nil {
		t.Fatal(err)
	}
	var typ uint32
	for {
		h := make([]byte, 20)
		if _, err := io.ReadFull(c, h); err != nil {
			t.Fatalf("reply to option %d: %v", code, err)
		}
		typ = binary.BigEndian.Uint32(h[12:])
		io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint32(h[16:])))
		if typ == repAck || typ&(1<<31) != 0 {
			return typ
		}
	}
}

// TestStartTLS: on a server that requires TLS, options before STARTTLS get
// ERR_TLS_REQD; after STARTTLS the export is served over TLS.
func TestStartTLS(t *testing.T) {
	cert, pool := selfSigned(t)
	srv := NewServer(memExports{&memBackend{data: make([]byte, 1<<20)}}, Options{
		TLS: &tls.Config{Certificates: []tls.Certificate{cert}}, RequireTLS: true,
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(context.Background(), l)
	defer srv.Shutdown(context.Background())

	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(testutil.HangGuard))
	io.ReadFull(c, make([]byte, 18))
	c.Write([]byte{0, 0, 0, 3})
	goData := append(append(binary.BigEndian.AppendUint32(nil, 1), 'm'), 0, 0)
	if typ := optRoundTrip(t, c, optGo, goData); typ != repErrTLSReqd {
		t.Fatalf("GO before STARTTLS answered %#x, want ERR_TLS_REQD", typ)
	}
	if typ := optRoundTrip(t, c, optStartTLS, nil); typ != repAck {
		t.Fatalf("STARTTLS answered %#x", typ)
	}
	tc := tls.Client(c, &tls.Config{RootCAs: pool, ServerName: "localhost"})
	if err := tc.Handshake(); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	if typ := optRoundTrip(t, tc, optGo, goData); typ != repAck {
		t.Fatalf("GO over TLS answered %#x", typ)
	}
	// One write and read back over TLS.
	tc.Write(request{typ: cmdWrite, cookie: 1, offset: 512, length: 4}.encode())
	tc.Write([]byte("umbr"))
	h := make([]byte, 16)
	io.ReadFull(tc, h)
	if binary.BigEndian.Uint32(h[4:]) != 0 {
		t.Fatalf("write over TLS failed: errno %d", binary.BigEndian.Uint32(h[4:]))
	}
	tc.Write(request{typ: cmdRead, cookie: 2, offset: 512, length: 4}.encode())
	io.ReadFull(tc, h)
	got := make([]byte, 4)
	io.ReadFull(tc, got)
	if string(got) != "umbr" {
		t.Fatalf("read over TLS: %q", got)
	}
}
