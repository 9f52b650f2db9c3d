package tasking

// Exported for the external tests only (this file is compiled into tests).

// WorkerAppName is the application_name of a worker's PostgreSQL
// connection, which tests use to find and kill exactly that connection.
var WorkerAppName = workerAppName

// NotifyChannel is the NOTIFY channel of a schema, which tests LISTEN on.
var NotifyChannel = notifyChannel

// SyncBuffer is a bytes.Buffer safe for concurrent writers, for test logs.
type SyncBuffer = syncBuffer
