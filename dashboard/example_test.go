package dashboard_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/dashboard"
)

func Example() {
	ctx := context.Background()
	dsn := os.Getenv("TASKING_DATABASE_URL")
	if dsn == "" {
		dsn = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	}
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	schema := fmt.Sprintf("example_dashboard_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}
	if _, err := client.Dispatch(ctx, "report", nil, tasking.Exclusive("ledger")); err != nil {
		log.Fatal(err)
	}

	// Mount the dashboard in the service's own mux, under /admin/tasks.
	mux := http.NewServeMux()
	mux.Handle("/admin/tasks/", http.StripPrefix("/admin/tasks", dashboard.New(client, dashboard.AllowCancel())))
	srv := httptest.NewServer(mux) // a real service: http.ListenAndServe(addr, mux)
	defer srv.Close()

	page, err := http.Get(srv.URL + "/admin/tasks/")
	if err != nil {
		log.Fatal(err)
	}
	page.Body.Close()
	fmt.Println(page.Status, page.Header.Get("Content-Type"))

	resp, err := http.Get(srv.URL + "/admin/tasks/api/stats")
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	var st dashboard.StatsView
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		log.Fatal(err)
	}
	for _, n := range st.Names {
		fmt.Printf("%s: %d waiting, unhandled=%v\n", n.Name, n.States[tasking.StateWaiting], n.Unhandled)
	}
	// Output:
	// 200 OK text/html; charset=utf-8
	// report: 1 waiting, unhandled=true
}
