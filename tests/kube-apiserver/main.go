// A real Kubernetes control plane for Mesh's tests: etcd (embedded),
// kube-apiserver (in this process) and kube-controller-manager (this binary
// re-executed as a child), all on loopback, built from the Kubernetes Go
// modules pinned in go.mod.
//
//	mesh-test-kube up --dir D
//
// prints one line `READY {"kubeconfig": ..., "server": ...}` once the API
// server answers /readyz and the controller manager has created the
// `default` ServiceAccount, then serves until stdin closes (the test that
// started it is gone) or SIGTERM. Everything lives under D: run `up` again
// on the same D and the same cluster comes back (same etcd data, ports,
// keys and certificates), as after an API server restart.
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/component-base/cli"
	apiapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	cmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

// The admin user's bearer token; the API server is on loopback only and
// lives as long as one test binary.
const adminToken = "mesh-test-admin"

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "mesh-test-kube: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: mesh-test-kube up --dir DIR | kube-controller-manager FLAGS")
	}
	switch os.Args[1] {
	case "up":
		if len(os.Args) != 4 || os.Args[2] != "--dir" {
			fail("usage: mesh-test-kube up --dir DIR")
		}
		up(os.Args[3])
	case "kube-controller-manager":
		exitWhenStdinCloses()
		cmd := cmapp.NewControllerManagerCommand()
		cmd.SetArgs(os.Args[2:])
		os.Exit(cli.Run(cmd))
	default:
		fail("unknown command %q", os.Args[1])
	}
}

// exitWhenStdinCloses ends the process when whoever started it is gone, so
// a crashed test never leaves a control plane behind.
func exitWhenStdinCloses() {
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// ports are kept in D so that a restart serves where clients look.
type ports struct {
	API        int `json:"api"`
	EtcdClient int `json:"etcdClient"`
	EtcdPeer   int `json:"etcdPeer"`
}

func loadPorts(dir string) ports {
	path := filepath.Join(dir, "ports.json")
	var p ports
	if data, err := os.ReadFile(path); err == nil && json.Unmarshal(data, &p) == nil && p.API != 0 {
		return p
	}
	p = ports{API: freePort(), EtcdClient: freePort(), EtcdPeer: freePort()}
	data, _ := json.Marshal(p)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		fail("%v", err)
	}
	return p
}

func up(dir string) {
	exitWhenStdinCloses()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fail("%v", err)
	}
	p := loadPorts(dir)
	etcd := startEtcd(dir, p)
	defer etcd.Close()

	saKey := filepath.Join(dir, "sa.key")
	saPub := filepath.Join(dir, "sa.pub")
	if _, err := os.Stat(saKey); err != nil {
		writeServiceAccountKeys(saKey, saPub)
	}
	tokens := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(adminToken+",admin,admin,system:masters\n"), 0o600); err != nil {
		fail("%v", err)
	}
	certDir := filepath.Join(dir, "certs")
	port := p.API
	server := "https://127.0.0.1:" + strconv.Itoa(port)
	api := apiapp.NewAPIServerCommand()
	api.SetArgs([]string{
		"--etcd-servers=http://" + etcd.Clients[0].Addr().String(),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		// The Endpoints of `kubernetes` may not hold a loopback address.
		"--endpoint-reconciler-type=none",
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + certDir,
		"--authorization-mode=RBAC",
		"--token-auth-file=" + tokens,
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + saPub,
		"--service-account-signing-key-file=" + saKey,
		"--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
		// No kube-proxy here to route ClusterIPs: webhooks are called at
		// their Service's endpoint (the pod IP), as aggregated APIs are.
		"--enable-aggregator-routing=true",
		"--service-cluster-ip-range=10.96.0.0/16",
		"--profiling=false",
		"--v=0",
	})
	apiDone := make(chan int, 1)
	go func() { apiDone <- cli.Run(api) }()

	waitReady(server, apiDone)
	caFile := filepath.Join(certDir, "apiserver.crt")
	ca, err := os.ReadFile(caFile)
	if err != nil {
		fail("the API server's certificate: %v", err)
	}
	kubeconfig := filepath.Join(dir, "admin.kubeconfig")
	writeKubeconfig(kubeconfig, server, ca)

	kcm, kcmExited := startControllerManager(dir, kubeconfig, saKey, caFile)
	waitDefaultServiceAccount(server, kcmExited)

	line, _ := json.Marshal(map[string]string{"kubeconfig": kubeconfig, "server": server, "token": adminToken})
	fmt.Printf("READY %s\n", line)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-signals:
	case code := <-apiDone:
		fmt.Fprintf(os.Stderr, "mesh-test-kube: the API server exited with %d\n", code)
	case err := <-kcmExited:
		fmt.Fprintf(os.Stderr, "mesh-test-kube: kube-controller-manager exited: %v\n", err)
	}
	_ = kcm.Process.Kill()
}

func startEtcd(dir string, p ports) *embed.Etcd {
	cfg := embed.NewConfig()
	cfg.Name = "default"
	cfg.Dir = filepath.Join(dir, "etcd")
	cfg.UnsafeNoFsync = true
	cfg.LogLevel = "error"
	client, _ := url.Parse("http://127.0.0.1:" + strconv.Itoa(p.EtcdClient))
	peer, _ := url.Parse("http://127.0.0.1:" + strconv.Itoa(p.EtcdPeer))
	cfg.ListenClientUrls = []url.URL{*client}
	cfg.AdvertiseClientUrls = []url.URL{*client}
	cfg.ListenPeerUrls = []url.URL{*peer}
	cfg.AdvertisePeerUrls = []url.URL{*peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		fail("etcd: %v", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		fail("etcd: %v", err)
	case <-time.After(60 * time.Second):
		fail("etcd was not ready in 60 s")
	}
	return e
}

func writeServiceAccountKeys(keyFile, pubFile string) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		fail("service account key: %v", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		fail("service account key: %v", err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		fail("service account key: %v", err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		fail("%v", err)
	}
	if err := os.WriteFile(pubFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644); err != nil {
		fail("%v", err)
	}
}

// insecureGet asks our own API server, before its certificate is known.
func insecureGet(server, path string) (int, error) {
	client := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}},
	}
	req, _ := http.NewRequest(http.MethodGet, server+path, nil)
	req.Header.Set("Authorization", "Bearer "+adminToken)
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

func waitReady(server string, apiDone <-chan int) {
	deadline := time.Now().Add(120 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case code := <-apiDone:
			fail("the API server exited with %d before it was ready", code)
		default:
		}
		if status, err := insecureGet(server, "/readyz"); err == nil && status == http.StatusOK {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	fail("the API server was not ready in 120 s")
}

func writeKubeconfig(path, server string, ca []byte) {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["test"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: adminToken}
	cfg.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "admin", Namespace: "default"}
	cfg.CurrentContext = "test"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		fail("kubeconfig: %v", err)
	}
}

// kcmStdin is the write end of the controller manager's stdin, held open
// for as long as this process lives.
var kcmStdin io.WriteCloser

func startControllerManager(dir, kubeconfig, saKey, caFile string) (*exec.Cmd, <-chan error) {
	self, err := os.Executable()
	if err != nil {
		fail("%v", err)
	}
	cmd := exec.Command(self, "kube-controller-manager",
		"--kubeconfig="+kubeconfig,
		// No kubelet heartbeats here: the node lifecycle controller would
		// taint the test node and evict its pods.
		"--controllers=*,-node-lifecycle-controller",
		"--use-service-account-credentials=false",
		"--service-account-private-key-file="+saKey,
		"--root-ca-file="+caFile,
		"--leader-elect=false",
		"--secure-port=0",
		"--kube-api-qps=100",
		"--kube-api-burst=200",
		"--v=0",
	)
	log, err := os.Create(filepath.Join(dir, "kube-controller-manager.log"))
	if err != nil {
		fail("%v", err)
	}
	cmd.Stdout = log
	cmd.Stderr = log
	// Its stdin is a pipe from us: when we are gone, it goes too.
	if kcmStdin, err = cmd.StdinPipe(); err != nil {
		fail("%v", err)
	}
	if err := cmd.Start(); err != nil {
		fail("kube-controller-manager: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	return cmd, exited
}

// waitDefaultServiceAccount waits for the controller manager's first work:
// the `default` ServiceAccount, which every Pod needs.
func waitDefaultServiceAccount(server string, exited <-chan error) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	for {
		select {
		case err := <-exited:
			fail("kube-controller-manager exited: %v (see its log next to the kubeconfig)", err)
		case <-ctx.Done():
			fail("kube-controller-manager made no default ServiceAccount in 120 s")
		default:
		}
		if status, err := insecureGet(server, "/api/v1/namespaces/default/serviceaccounts/default"); err == nil && status == http.StatusOK {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}
