module github.com/panosc/analysis-operator/bench/gowebhook

go 1.26.0
