# Developer shortcuts. The two commands a new user needs work without make:
#   ./scripts/demo.sh   and   ./scripts/test.sh

.PHONY: help demo test test-short bench lint fmt browser-check

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-11s %s\n", $$1, $$2}'

demo: ## run the quickstart demo (starts throwaway PostgreSQL/Redis if none is reachable)
	./scripts/demo.sh

test: ## run the whole test suite with -race
	./scripts/test.sh

test-short: ## run the test suite without the slower fleet tests
	./scripts/test.sh -short

browser-check: ## load the dashboard's pages in headless Chromium (installs it as root)
	./scripts/browser-check.sh

bench: ## run the Go benchmarks once each
	./scripts/services.sh go test -run '^$$' -bench . -benchtime 1x ./...

lint: ## gofmt, go mod tidy -diff, go vet, and staticcheck when installed
	@test -z "$$(gofmt -l .)" || { gofmt -l .; echo "gofmt: files above need formatting"; exit 1; }
	go mod tidy -diff
	go vet ./...
	@if command -v staticcheck >/dev/null; then staticcheck ./...; else echo "staticcheck not installed (go install honnef.co/go/tools/cmd/staticcheck@latest)"; fi

fmt: ## format the code
	gofmt -w .
