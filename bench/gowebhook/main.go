// Command gowebhook is the limit bench/budget_race.py --webhook go measures the operator's admission
// against (issue 17, G6): the same two webhook calls an environment's create costs the API server,
// answered by a Go server that decides the race as the operator does, from memory, and nothing else.
//
//   - /environment-owner (mutating, CREATE): refuses a create whose owner already holds -slots
//     admitted creates (the operator's early refusal, one call per refused create), and otherwise
//     stamps the owner label as the operator does.
//   - /environment-admission (validating, CREATE): admits while the owner holds fewer than -slots,
//     counting each admitted create (the operator's slot held at admission).
//
// Like the operator's port it speaks HTTPS over HTTP/1.1 only (the API server calls a webhook behind
// a Service over HTTP/1.1), sends no TLS session tickets, and accepts only clients with a
// certificate from -client-ca (the API server's). A dry run is decided but holds no slot. It prints
// one line, "listening", once it accepts connections.
//
//	gowebhook -listen 127.0.0.1:9443 -cert tls.crt -key tls.key -client-ca ca.crt -slots 50
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"sync"
)

const ownerLabel = "analysis.panosc.eu/owner"

type review struct {
	APIVersion string    `json:"apiVersion"`
	Kind       string    `json:"kind"`
	Request    *request  `json:"request,omitempty"`
	Response   *response `json:"response,omitempty"`
}

type request struct {
	UID       string `json:"uid"`
	Operation string `json:"operation"`
	DryRun    *bool  `json:"dryRun,omitempty"`
	Object    struct {
		Metadata struct {
			Labels map[string]string `json:"labels"`
		} `json:"metadata"`
		Spec struct {
			Owner string `json:"owner"`
		} `json:"spec"`
	} `json:"object"`
}

type status struct {
	Code    int    `json:"code"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

type response struct {
	UID       string  `json:"uid"`
	Allowed   bool    `json:"allowed"`
	Status    *status `json:"status,omitempty"`
	PatchType string  `json:"patchType,omitempty"`
	Patch     string  `json:"patch,omitempty"`
}

// slots counts the admitted creates per owner.
type slots struct {
	mu    sync.Mutex
	limit int
	held  map[string]int
}

func (s *slots) full(owner string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.held[owner] >= s.limit
}

// take holds one of owner's slots if one is free.
func (s *slots) take(owner string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.held[owner] >= s.limit {
		return false
	}
	s.held[owner]++
	return true
}

func refusal(owner string, limit int) *status {
	return &status{Code: 403, Reason: "Forbidden", Message: fmt.Sprintf("%s already runs %d environments", owner, limit)}
}

// serve decodes an AdmissionReview, answers it with decide, and writes the review back.
func serve(decide func(*request) *response) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var in review
		if err := json.NewDecoder(r.Body).Decode(&in); err != nil || in.Request == nil {
			http.Error(w, "not an AdmissionReview", http.StatusBadRequest)
			return
		}
		out := decide(in.Request)
		out.UID = in.Request.UID
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(review{APIVersion: in.APIVersion, Kind: in.Kind, Response: out})
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:9443", "address to listen on")
	cert := flag.String("cert", "", "serving certificate (PEM)")
	key := flag.String("key", "", "its key (PEM)")
	clientCA := flag.String("client-ca", "", "CA of the API server's client certificate (PEM)")
	limit := flag.Int("slots", 50, "environments at once per owner")
	flag.Parse()

	pair, err := tls.LoadX509KeyPair(*cert, *key)
	if err != nil {
		log.Fatal(err)
	}
	pem, err := os.ReadFile(*clientCA)
	if err != nil {
		log.Fatal(err)
	}
	clients := x509.NewCertPool()
	if !clients.AppendCertsFromPEM(pem) {
		log.Fatalf("no certificate in %s", *clientCA)
	}
	held := &slots{limit: *limit, held: map[string]int{}}

	mux := http.NewServeMux()
	mux.HandleFunc("/environment-owner", serve(func(req *request) *response {
		owner := req.Object.Spec.Owner
		if req.Operation == "CREATE" && held.full(owner) {
			return &response{Allowed: false, Status: refusal(owner, *limit)}
		}
		labels := map[string]string{}
		for name, value := range req.Object.Metadata.Labels {
			labels[name] = value
		}
		labels[ownerLabel] = owner
		patch := []map[string]any{{"op": "add", "path": "/metadata/labels", "value": labels}}
		raw, _ := json.Marshal(patch)
		return &response{Allowed: true, PatchType: "JSONPatch", Patch: base64.StdEncoding.EncodeToString(raw)}
	}))
	mux.HandleFunc("/environment-admission", serve(func(req *request) *response {
		owner := req.Object.Spec.Owner
		if req.Operation != "CREATE" || (req.DryRun != nil && *req.DryRun) {
			return &response{Allowed: true}
		}
		if !held.take(owner) {
			return &response{Allowed: false, Status: refusal(owner, *limit)}
		}
		return &response{Allowed: true}
	}))
	mux.HandleFunc("/", serve(func(*request) *response { return &response{Allowed: true} }))

	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	server := &http.Server{
		Handler:      mux,
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){}, // HTTP/1.1 only
		TLSConfig: &tls.Config{
			Certificates:           []tls.Certificate{pair},
			ClientAuth:             tls.RequireAndVerifyClientCert,
			ClientCAs:              clients,
			SessionTicketsDisabled: true,
			NextProtos:             []string{"http/1.1"},
		},
		ErrorLog: log.New(os.Stderr, "", 0),
	}
	fmt.Println("listening")
	log.Fatal(server.ServeTLS(listener, "", ""))
}
