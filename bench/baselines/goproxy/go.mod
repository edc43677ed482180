module benchgoproxy

go 1.19
