// Command goraw is the limit bench/run.py measures the operator against (issue 17): it creates N
// copies of the Secret, Service and Pod that the operator makes for one environment, straight
// through client-go with no client-side rate limit, and waits until all N pods are Running.
//
// The shapes come from a real environment (bench/run.py dumps them from a live stack, or see
// shapes.json): server-set fields stripped, and the placeholders {{name}}, {{namespace}} and {{uid}}
// where the environment's name, namespace and uid were. Each copy drops its owner reference (its
// environment does not exist: the garbage collector would delete it) and is labelled
// app.kubernetes.io/managed-by=<-manager> instead of the operator's value (the operator would treat
// it as its own). Secrets get a fresh random value of the same length, as the operator's tokens.
//
// All N copies are rendered before the clock starts. It prints one JSON object on stdout.
//
//	goraw -kubeconfig K -namespace NS -n 1000 -shapes shapes.json
package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/uuid"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

const labelManagedBy = "app.kubernetes.io/managed-by"

type options struct {
	kubeconfig, namespace, shapes, manager, prefix, contentType string
	n, workers                                                  int
	timeout                                                     time.Duration
	createNamespace                                             bool
}

// environment is what the operator makes for one environment, as typed objects.
type environment struct {
	secret  *corev1.Secret
	service *corev1.Service
	pod     *corev1.Pod
}

type result struct {
	N           int     `json:"n"`
	Workers     int     `json:"workers"`
	Namespace   string  `json:"namespace"`
	ContentType string  `json:"content_type"`
	Errors      int64   `json:"errors"`
	FirstError  string  `json:"first_error,omitempty"`
	PostedS     float64 `json:"posted_s"`  // creates began -> the last create answered
	ElapsedS    float64 `json:"elapsed_s"` // creates began -> the last pod seen Running (watch event)
	Running     int     `json:"running"`
	TimedOut    bool    `json:"timed_out"`
	CPUBurstS   float64 `json:"cpu_burst_s"` // this process, creates began -> end (user + system)
	CPUTotalS   float64 `json:"cpu_total_s"` // this process, whole life
	ClientGo    string  `json:"client_go"`
}

func main() {
	var o options
	flag.StringVar(&o.kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file")
	flag.StringVar(&o.namespace, "namespace", "", "namespace to create in (must exist unless -create-namespace)")
	flag.StringVar(&o.shapes, "shapes", "shapes.json", `{"secret": ..., "service": ..., "pod": ...} with {{name}}, {{namespace}}, {{uid}}`)
	flag.StringVar(&o.manager, "manager", "bench-goraw", "value of "+labelManagedBy+" on the copies")
	flag.StringVar(&o.prefix, "prefix", "g", "environment names are <prefix>00000, <prefix>00001, ...")
	flag.StringVar(&o.contentType, "content-type", "json", "wire format of the requests: json (as the operator) or protobuf")
	flag.IntVar(&o.n, "n", 1000, "environments (Secret + Service + Pod each)")
	flag.IntVar(&o.workers, "workers", 64, "concurrent workers, each creating Secret, Service, Pod in turn")
	flag.DurationVar(&o.timeout, "timeout", 10*time.Minute, "give up waiting for Running after this")
	flag.BoolVar(&o.createNamespace, "create-namespace", false, "create the namespace and wait for its default ServiceAccount")
	flag.Parse()
	if o.namespace == "" || o.n <= 0 || o.workers <= 0 {
		fail(errors.New("-namespace, -n > 0 and -workers > 0 are required"))
	}
	out, err := run(o)
	if err != nil {
		fail(err)
	}
	encoded, _ := json.Marshal(out)
	fmt.Println(string(encoded))
	if out.TimedOut {
		os.Exit(1)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "goraw:", err)
	os.Exit(2)
}

func run(o options) (*result, error) {
	config, err := clientcmd.BuildConfigFromFlags("", o.kubeconfig)
	if err != nil {
		return nil, err
	}
	config.QPS, config.Burst = -1, 0 // no client-side rate limiter
	config.UserAgent = "bench-goraw"
	switch o.contentType {
	case "json":
		config.ContentType = runtime.ContentTypeJSON
	case "protobuf":
		config.ContentType = runtime.ContentTypeProtobuf
		config.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	default:
		return nil, fmt.Errorf("-content-type %q: json or protobuf", o.contentType)
	}
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	if o.createNamespace {
		if err := ensureNamespace(ctx, client, o.namespace); err != nil {
			return nil, err
		}
	}
	environments, err := render(o)
	if err != nil {
		return nil, err
	}
	watcher, err := startWatch(ctx, client, o.namespace, labelManagedBy+"="+o.manager)
	if err != nil {
		return nil, err
	}

	out := &result{N: o.n, Workers: o.workers, Namespace: o.namespace, ContentType: o.contentType, ClientGo: clientGoVersion()}
	cpuBegan := cpuSeconds()
	began := time.Now()
	var failed atomic.Int64
	var firstError sync.Once
	indexes := make(chan int)
	var workers sync.WaitGroup
	for range o.workers {
		workers.Add(1)
		go func() {
			defer workers.Done()
			for index := range indexes {
				if err := create(ctx, client, o.namespace, environments[index]); err != nil {
					failed.Add(1)
					firstError.Do(func() { out.FirstError = err.Error() })
				}
			}
		}()
	}
	for index := range environments {
		indexes <- index
	}
	close(indexes)
	workers.Wait()
	out.PostedS = time.Since(began).Seconds()
	out.Errors = failed.Load()

	expected := o.n - int(out.Errors)
	running, last := watcher.waitFor(ctx, expected)
	out.Running = running
	out.TimedOut = running < expected
	if !last.IsZero() {
		out.ElapsedS = last.Sub(began).Seconds()
	}
	out.CPUBurstS = cpuSeconds() - cpuBegan
	out.CPUTotalS = cpuSeconds()
	return out, nil
}

// create makes one environment's children in the operator's order: Secret, Service, Pod.
func create(ctx context.Context, client kubernetes.Interface, namespace string, environment environment) error {
	core := client.CoreV1()
	if _, err := core.Secrets(namespace).Create(ctx, environment.secret, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("secret %s: %w", environment.secret.Name, err)
	}
	if _, err := core.Services(namespace).Create(ctx, environment.service, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("service %s: %w", environment.service.Name, err)
	}
	if _, err := core.Pods(namespace).Create(ctx, environment.pod, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("pod %s: %w", environment.pod.Name, err)
	}
	return nil
}

// ---------------------------------------------------------------------------- rendering

func render(o options) ([]environment, error) {
	raw, err := os.ReadFile(o.shapes)
	if err != nil {
		return nil, err
	}
	var shapes map[string]map[string]any
	if err := json.Unmarshal(raw, &shapes); err != nil {
		return nil, fmt.Errorf("%s: %w", o.shapes, err)
	}
	for _, kind := range []string{"secret", "service", "pod"} {
		if shapes[kind] == nil {
			return nil, fmt.Errorf("%s: no %q", o.shapes, kind)
		}
	}
	environments := make([]environment, o.n)
	for index := range environments {
		replacer := strings.NewReplacer(
			"{{name}}", fmt.Sprintf("%s%05d", o.prefix, index),
			"{{namespace}}", o.namespace,
			"{{uid}}", string(uuid.NewUUID()),
		)
		environment := &environments[index]
		environment.secret = &corev1.Secret{}
		environment.service = &corev1.Service{}
		environment.pod = &corev1.Pod{}
		for kind, target := range map[string]runtime.Object{
			"secret": environment.secret, "service": environment.service, "pod": environment.pod,
		} {
			body := substitute(shapes[kind], replacer).(map[string]any)
			if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(body, target, true); err != nil {
				return nil, fmt.Errorf("%s shape: %w", kind, err)
			}
			meta, _ := target.(metav1.Object)
			meta.SetNamespace(o.namespace)
			meta.SetOwnerReferences(nil)
			labels := meta.GetLabels()
			if labels == nil {
				labels = map[string]string{}
			}
			labels[labelManagedBy] = o.manager
			meta.SetLabels(labels)
		}
		for key, value := range environment.secret.Data {
			environment.secret.Data[key] = randomToken(len(value))
		}
	}
	return environments, nil
}

// substitute copies a decoded JSON value, with the placeholders replaced in every string.
func substitute(value any, replacer *strings.Replacer) any {
	switch typed := value.(type) {
	case map[string]any:
		copied := make(map[string]any, len(typed))
		for key, item := range typed {
			copied[replacer.Replace(key)] = substitute(item, replacer)
		}
		return copied
	case []any:
		copied := make([]any, len(typed))
		for index, item := range typed {
			copied[index] = substitute(item, replacer)
		}
		return copied
	case string:
		return replacer.Replace(typed)
	default:
		return typed
	}
}

// randomToken is a URL-safe random string of the given length (the operator's tokens are).
func randomToken(length int) []byte {
	random := make([]byte, length)
	_, _ = rand.Read(random)
	return []byte(base64.RawURLEncoding.EncodeToString(random)[:length])
}

// ---------------------------------------------------------------------------- watching

type podWatcher struct {
	mu       sync.Mutex
	running  map[string]bool
	last     time.Time
	progress chan struct{}
}

// startWatch lists then watches the pods with the selector; a pod counts once, at the arrival of
// the first event that shows it Running (as bench/run.py's watches do).
func startWatch(ctx context.Context, client kubernetes.Interface, namespace, selector string) (*podWatcher, error) {
	pods := client.CoreV1().Pods(namespace)
	list, err := pods.List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return nil, err
	}
	w := &podWatcher{running: map[string]bool{}, progress: make(chan struct{}, 1)}
	for i := range list.Items {
		w.observe(&list.Items[i])
	}
	resourceVersion := list.ResourceVersion
	go func() {
		for ctx.Err() == nil {
			stream, err := pods.Watch(ctx, metav1.ListOptions{
				LabelSelector: selector, ResourceVersion: resourceVersion, AllowWatchBookmarks: true,
			})
			if err != nil {
				time.Sleep(200 * time.Millisecond)
				continue
			}
			for event := range stream.ResultChan() {
				switch event.Type {
				case watch.Error:
					if status, ok := event.Object.(*metav1.Status); ok && status.Code == 410 { // expired: list again
						if again, err := pods.List(ctx, metav1.ListOptions{LabelSelector: selector}); err == nil {
							for i := range again.Items {
								w.observe(&again.Items[i])
							}
							resourceVersion = again.ResourceVersion
						}
					}
					stream.Stop()
				case watch.Bookmark, watch.Added, watch.Modified, watch.Deleted:
					if pod, ok := event.Object.(*corev1.Pod); ok {
						resourceVersion = pod.ResourceVersion
						if event.Type != watch.Bookmark {
							w.observe(pod)
						}
					}
				}
			}
		}
	}()
	return w, nil
}

func (w *podWatcher) observe(pod *corev1.Pod) {
	if pod.Status.Phase != corev1.PodRunning {
		return
	}
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.running[pod.Name] {
		return
	}
	w.running[pod.Name] = true
	w.last = now
	select {
	case w.progress <- struct{}{}:
	default:
	}
}

// waitFor returns how many pods are Running and when the last of them was seen, once there are
// `expected` of them or the context ends.
func (w *podWatcher) waitFor(ctx context.Context, expected int) (int, time.Time) {
	for {
		w.mu.Lock()
		count, last := len(w.running), w.last
		w.mu.Unlock()
		if count >= expected {
			return count, last
		}
		select {
		case <-w.progress:
		case <-ctx.Done():
			return count, last
		}
	}
}

// ---------------------------------------------------------------------------- helpers

func ensureNamespace(ctx context.Context, client kubernetes.Interface, name string) error {
	namespace := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"bench": "goraw"}}}
	if _, err := client.CoreV1().Namespaces().Create(ctx, namespace, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	for ctx.Err() == nil { // pods are refused until the default ServiceAccount exists
		if _, err := client.CoreV1().ServiceAccounts(name).Get(ctx, "default", metav1.GetOptions{}); err == nil {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("no default ServiceAccount in %s", name)
}

func cpuSeconds() float64 {
	var usage syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &usage)
	return time.Duration(usage.Utime.Nano() + usage.Stime.Nano()).Seconds()
}

func clientGoVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, module := range info.Deps {
			if module.Path == "k8s.io/client-go" {
				return module.Version
			}
		}
	}
	return "unknown"
}
