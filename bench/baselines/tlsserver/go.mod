module benchtlsserver

go 1.19
